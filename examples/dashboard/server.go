package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fbbf71ac/subproc"
)

// This file holds the dashboard's own endpoints, which the parent serves
// itself:
//
//	GET  /api/state                    every module, its children and counters, and the recent events
//	GET  /api/live                     the same, pushed as server-sent events, with each module's history (live.go)
//	GET  /api/events/{seq}/output      the last output lines of one event, as text
//	POST /api/modules/{name}/restart   a rolling restart of one module (Handle.Restart)
//	GET  /readyz                       200 when every module is ready, else 503
//
// The page follows /api/live alone: everything it shows, bar an event's
// output and the log, comes down that one stream.

// restartTimeout bounds a restart asked for from the dashboard: each child's
// replacement must start (StartTimeout) and the old child drain
// (ShutdownTimeout), one child after the other.
const restartTimeout = time.Minute

// A module is one started module of the dashboard.
type module struct {
	name string          // fixed
	h    *subproc.Handle // fixed
	opts subproc.Options // fixed; as given to subproc.Start
	// metrics is the module's history as the parent measures it; nil in
	// tests that need none.
	metrics *moduleMetrics

	restarting atomic.Bool // a restart asked for from the dashboard is under way
}

// A server serves the dashboard's own endpoints.
type server struct {
	modules []*module          // fixed; in the order of moduleNames
	events  *eventRing         // fixed
	closing context.Context    // fixed; canceled when the dashboard begins to shut down
	byName  map[string]*module // fixed
}

func newServer(modules []*module, events *eventRing, closing context.Context) *server {
	s := &server{modules: modules, events: events, closing: closing, byName: make(map[string]*module)}
	for _, m := range modules {
		s.byName[m.name] = m
	}
	return s
}

// register adds the server's endpoints to mux.
func (s *server) register(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/state", s.serveState)
	mux.HandleFunc("GET /api/live", s.serveLive)
	mux.HandleFunc("GET /api/events/{seq}/output", s.serveEventOutput)
	mux.HandleFunc("POST /api/modules/{name}/restart", s.serveRestart)
	mux.HandleFunc("GET /readyz", s.serveReady)
}

// stateView is GET /api/state.
type stateView struct {
	Time    time.Time      `json:"time"`
	Ready   bool           `json:"ready"` // every module is ready, as /readyz says
	Modules []moduleStatus `json:"modules"`
	Events  []eventView    `json:"events,omitempty"` // the last maxEvents, newest first; not in /api/live's state, which sends events one by one
}

// moduleStatus is one module in GET /api/state.
type moduleStatus struct {
	Name        string `json:"name"`
	State       string `json:"state"`       // as subproc.Stats.State
	Ready       bool   `json:"ready"`       // Handle.Ready
	Restarting  bool   `json:"restarting"`  // a restart asked for from the dashboard is under way
	PoolSize    int    `json:"poolSize"`    // Options.Children
	MaxRequests int    `json:"maxRequests"` // Options.MaxRequests; 0: no limit
	MemoryHigh  int64  `json:"memoryHigh"`  // Options.MemoryHigh in bytes; 0: no limit
	MemoryMax   int64  `json:"memoryMax"`   // Options.MemoryMax in bytes; 0: no limit
	StuckAfter  string `json:"stuckAfter"`  // Options.StuckTimeout, as in "3s"; "" for the default
	LogFile     string `json:"logFile"`     // the module's log, <LogDir>/<name>.log, where a stuck child's stacks go
	Pid         int    `json:"pid"`         // the newest running child's
	Incarnation int    `json:"incarnation"`
	Restarts    int    `json:"restarts"`
	InFlight    int    `json:"inFlight"`
	LastHealth  string `json:"lastHealth"` // round trip of the newest child's last good health check, e.g. "412µs"
	LastExit    string `json:"lastExit"`   // how the last child that died ended; "" if none has

	// Counters since the module started.
	Requests    uint64 `json:"requests"`
	BadGateway  uint64 `json:"badGateway"`
	Unavailable uint64 `json:"unavailable"`
	Timeouts    uint64 `json:"timeouts"`
	Aborted     uint64 `json:"aborted"`

	Children []childStatus `json:"children"` // by slot, then oldest first
}

// childStatus is one child process of a module in GET /api/state.
type childStatus struct {
	Slot         int       `json:"slot"`
	Pid          int       `json:"pid"`
	Incarnation  int       `json:"incarnation"`
	State        string    `json:"state"` // "starting", "running", "unhealthy" or "draining"
	Started      time.Time `json:"started,omitzero"`
	Age          string    `json:"age"` // how long it has been ready, e.g. "1m3s"; "" while it starts
	InFlight     int       `json:"inFlight"`
	Requests     uint64    `json:"requests"`
	Memory       int64     `json:"memory"`     // resident bytes; 0 if unknown
	LastHealth   string    `json:"lastHealth"` // e.g. "412µs"; "" before its first good check
	FailedChecks int       `json:"failedChecks"`
}

// serveState answers GET /api/state.
func (s *server) serveState(w http.ResponseWriter, r *http.Request) {
	st := s.state(time.Now())
	st.Events = s.events.views()
	writeJSON(w, http.StatusOK, st)
}

// state returns every module's status at now, without the events.
func (s *server) state(now time.Time) stateView {
	st := stateView{Time: now, Ready: true}
	for _, m := range s.modules {
		ms := m.status(now)
		st.Ready = st.Ready && ms.Ready
		st.Modules = append(st.Modules, ms)
	}
	return st
}

// status returns m's row of GET /api/state at now.
func (m *module) status(now time.Time) moduleStatus {
	st := m.h.Stats()
	ms := moduleStatus{
		Name:        m.name,
		State:       st.State,
		Ready:       m.h.Ready(),
		Restarting:  m.restarting.Load(),
		PoolSize:    max(m.opts.Children, 1),
		MaxRequests: m.opts.MaxRequests,
		MemoryHigh:  m.opts.MemoryHigh,
		MemoryMax:   m.opts.MemoryMax,
		Pid:         st.Pid,
		Incarnation: st.Incarnation,
		Restarts:    st.Restarts,
		InFlight:    st.InFlight,
		LastHealth:  roundTrip(st.LastHealth),
		LastExit:    st.LastExit,
		Requests:    st.Requests,
		BadGateway:  st.BadGateway,
		Unavailable: st.Unavailable,
		Timeouts:    st.Timeouts,
		Aborted:     st.Aborted,
		Children:    make([]childStatus, 0, len(st.Children)),
	}
	if m.opts.StuckTimeout > 0 {
		ms.StuckAfter = m.opts.StuckTimeout.String()
	}
	if m.opts.LogDir != "" {
		ms.LogFile = filepath.Join(m.opts.LogDir, m.name+".log")
	}
	for _, c := range st.Children {
		cs := childStatus{
			Slot:         c.Slot,
			Pid:          c.Pid,
			Incarnation:  c.Incarnation,
			State:        c.State,
			Started:      c.Started,
			InFlight:     c.InFlight,
			Requests:     c.Requests,
			Memory:       c.Memory,
			LastHealth:   roundTrip(c.LastHealth),
			FailedChecks: c.FailedChecks,
		}
		if !c.Started.IsZero() {
			cs.Age = now.Sub(c.Started).Round(time.Second).String()
		}
		ms.Children = append(ms.Children, cs)
	}
	slices.SortStableFunc(ms.Children, func(a, b childStatus) int {
		return cmp.Or(cmp.Compare(a.Slot, b.Slot), cmp.Compare(a.Incarnation, b.Incarnation))
	})
	return ms
}

// roundTrip formats a health check's round trip, or "" for none.
func roundTrip(d time.Duration) string {
	if d <= 0 {
		return ""
	}
	return d.Round(time.Microsecond).String()
}

// serveEventOutput answers GET /api/events/{seq}/output with the last
// output lines of the child the event is about, as plain text.
func (s *server) serveEventOutput(w http.ResponseWriter, r *http.Request) {
	seq, err := strconv.ParseUint(r.PathValue("seq"), 10, 64)
	if err != nil {
		http.Error(w, "the event number must be a positive integer, as in /api/events/12/output", http.StatusBadRequest)
		return
	}
	text, ok := s.events.output(seq)
	if !ok {
		http.Error(w, fmt.Sprintf("event %d is not kept: the dashboard keeps the last %d events; reload the page", seq, maxEvents), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Write([]byte(text))
}

// serveReady answers GET /readyz: 200 if every module is ready, 503 naming
// those that are not otherwise.
func (s *server) serveReady(w http.ResponseWriter, r *http.Request) {
	var notReady []string
	for _, m := range s.modules {
		if !m.h.Ready() {
			notReady = append(notReady, m.name)
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	if len(notReady) > 0 {
		http.Error(w, "not ready: "+strings.Join(notReady, ", "), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("ready\n"))
}

// restartResult is the answer to POST /api/modules/{name}/restart.
type restartResult struct {
	Module string `json:"module"`
	OK     bool   `json:"ok"`
	Took   string `json:"took,omitempty"` // how long the restart took, e.g. "1.2s"
	Error  string `json:"error,omitempty"`
	// StartError is set when a new child could not start: the old one
	// keeps serving, and the children after it were not replaced.
	StartError *startErrorView `json:"startError,omitempty"`
}

// startErrorView is a *subproc.StartError in JSON.
type startErrorView struct {
	Module string   `json:"module"`
	Err    string   `json:"err"`    // what went wrong: the module's own error if its ModuleFunc failed
	Output []string `json:"output"` // the child's last lines of output
}

// serveRestart answers POST /api/modules/{name}/restart: it replaces every
// child of the module, one at a time (Handle.Restart), and says how it went:
// 200 once every child was replaced; 500 with a startError if a new child
// could not start (the old one serves on); 504 if it took longer than
// restartTimeout; 409 if a restart of the module is already under way;
// 503 if the dashboard is shutting down. The restart is the dashboard's,
// not the client's: a client that goes away does not cancel it.
func (s *server) serveRestart(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	m := s.byName[name]
	if m == nil {
		writeJSON(w, http.StatusNotFound, restartResult{Module: name, Error: fmt.Sprintf("there is no module %q; the modules are %s", name, strings.Join(moduleNames, ", "))})
		return
	}
	if !m.restarting.CompareAndSwap(false, true) {
		writeJSON(w, http.StatusConflict, restartResult{Module: name, Error: fmt.Sprintf("a restart of module %q is already under way; wait for it to end", name)})
		return
	}
	defer m.restarting.Store(false)

	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), restartTimeout)
	defer cancel()
	defer context.AfterFunc(s.closing, cancel)()
	start := time.Now()
	err := m.h.Restart(ctx)
	res := restartResult{Module: name, OK: err == nil, Took: time.Since(start).Round(time.Millisecond).String()}
	status := http.StatusOK
	if err != nil {
		res.Error = err.Error()
		var se *subproc.StartError
		if errors.As(err, &se) {
			res.StartError = &startErrorView{Module: se.Module, Output: se.Output}
			if se.Err != nil {
				res.StartError.Err = se.Err.Error()
			}
		}
		switch {
		case s.closing.Err() != nil || errors.Is(err, subproc.ErrClosed):
			status = http.StatusServiceUnavailable
			res.Error = fmt.Sprintf("restart of module %q cut short: the dashboard is shutting down (%v)", name, err)
		case errors.Is(err, context.DeadlineExceeded):
			status = http.StatusGatewayTimeout
			res.Error = fmt.Sprintf("restart of module %q did not end within %v; the children not yet replaced keep serving: %v", name, restartTimeout, err)
		default:
			status = http.StatusInternalServerError
		}
		log.Printf("restart of module %s failed after %s: %v", name, res.Took, err)
	} else {
		log.Printf("restarted module %s in %s", name, res.Took)
	}
	writeJSON(w, status, res)
}

// writeJSON answers with v as JSON, never cached.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
