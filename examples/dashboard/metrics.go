package main

import (
	"context"
	"math"
	"net/http"
	"sync"
	"time"

	"github.com/fbbf71ac/subproc"
)

// This file measures each module from the parent, for the dashboard's
// charts: requests a second and their latency (p50, p99), as a middleware
// in front of the module's Handle sees them; each slot's resident memory,
// sampled every second from Stats; and the children that ended, from the
// events. It keeps the last historySeconds seconds in a fixed ring, so its
// memory is bounded however long the dashboard runs.

// historySeconds is how many seconds of history each module keeps.
const historySeconds = 300

// Latency is counted in a histogram of latencyBuckets buckets per second,
// each about 19% wider than the one before: bucket i holds durations up to
// bucketBound(i), from 50µs to about 52s; the last also holds anything
// longer. A percentile is its bucket's bound, so it is at most 19% high.
const (
	latencyBuckets = 80
	latencyBase    = 50 * time.Microsecond
)

// bucketBound returns the largest duration bucket i holds.
func bucketBound(i int) time.Duration {
	return time.Duration(float64(latencyBase) * math.Exp2(float64(i)/4))
}

// bucketOf returns the bucket that holds d.
func bucketOf(d time.Duration) int {
	if d <= latencyBase {
		return 0
	}
	i := int(math.Ceil(4 * math.Log2(float64(d)/float64(latencyBase))))
	return min(i, latencyBuckets-1)
}

// A second is what a module's metrics hold of one second.
type second struct {
	unix     int64 // the second it is; a slot of the ring that holds another is stale
	requests uint32
	errors   uint32 // 5xx answers, and responses cut off (a panic through the middleware)
	exits    uint32 // children that ended
	latency  [latencyBuckets]uint32
	memory   []int64 // resident bytes by slot: the most any child of the slot had; 0 if none known
}

// moduleMetrics is one module's history. Its methods may be called
// concurrently.
type moduleMetrics struct {
	slots int // fixed; Options.Children

	mu   sync.Mutex // guards ring
	ring [historySeconds]second
}

// newModuleMetrics returns an empty history for a module of slots children.
func newModuleMetrics(slots int) *moduleMetrics {
	m := &moduleMetrics{slots: slots}
	for i := range m.ring {
		m.ring[i].memory = make([]int64, slots)
	}
	return m
}

// atLocked returns the ring's slot for second unix, cleared if it held an
// older second. m.mu must be held.
func (m *moduleMetrics) atLocked(unix int64) *second {
	s := &m.ring[unix%historySeconds]
	if s.unix != unix {
		mem := s.memory
		clear(mem)
		*s = second{unix: unix, memory: mem}
	}
	return s
}

// observe records a request that ended at t after d with status (0: cut
// off).
func (m *moduleMetrics) observe(t time.Time, d time.Duration, status int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.atLocked(t.Unix())
	s.requests++
	if status == 0 || status >= 500 {
		s.errors++
	}
	s.latency[bucketOf(d)]++
}

// childEnded records a child that ended at t.
func (m *moduleMetrics) childEnded(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.atLocked(t.Unix()).exits++
}

// sample records each slot's memory at t, as st shows it.
func (m *moduleMetrics) sample(t time.Time, st subproc.Stats) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.atLocked(t.Unix())
	for _, c := range st.Children {
		if c.Slot >= 0 && c.Slot < len(s.memory) {
			s.memory[c.Slot] = max(s.memory[c.Slot], c.Memory)
		}
	}
}

// seriesView is a module's history in the live stream: one value a second,
// oldest first, for the historySeconds seconds up to the last whole one.
// A latency of -1 is a second without requests.
type seriesView struct {
	Start    int64     `json:"start"` // the Unix time of the first second
	Requests []uint32  `json:"requests"`
	Errors   []uint32  `json:"errors"`
	P50      []float64 `json:"p50"` // milliseconds
	P99      []float64 `json:"p99"` // milliseconds
	Exits    []uint32  `json:"exits"`
	Memory   [][]int64 `json:"memory"` // by slot, then by second; 0: unknown
}

// series returns the history up to the second before now's.
func (m *moduleMetrics) series(now time.Time) seriesView {
	end := now.Unix() // exclusive: the current second is not over
	start := end - historySeconds
	v := seriesView{
		Start:    start,
		Requests: make([]uint32, historySeconds),
		Errors:   make([]uint32, historySeconds),
		P50:      make([]float64, historySeconds),
		P99:      make([]float64, historySeconds),
		Exits:    make([]uint32, historySeconds),
		Memory:   make([][]int64, m.slots),
	}
	for i := range v.Memory {
		v.Memory[i] = make([]int64, historySeconds)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range historySeconds {
		unix := start + int64(i)
		v.P50[i], v.P99[i] = -1, -1
		s := &m.ring[unix%historySeconds]
		if s.unix != unix {
			continue
		}
		v.Requests[i], v.Errors[i], v.Exits[i] = s.requests, s.errors, s.exits
		if s.requests > 0 {
			v.P50[i] = millis(percentile(&s.latency, s.requests, 0.50))
			v.P99[i] = millis(percentile(&s.latency, s.requests, 0.99))
		}
		for slot, b := range s.memory {
			v.Memory[slot][i] = b
		}
	}
	return v
}

// percentile returns the bound of the bucket that holds the q quantile of
// the n durations of h.
func percentile(h *[latencyBuckets]uint32, n uint32, q float64) time.Duration {
	rank := uint32(math.Ceil(q * float64(n)))
	var seen uint32
	for i, c := range h {
		if seen += c; seen >= max(rank, 1) {
			return bucketBound(i)
		}
	}
	return bucketBound(latencyBuckets - 1)
}

// millis returns d in milliseconds, to the microsecond.
func millis(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

// measure returns h, recording in m how long each request took and how it
// ended.
func measure(m *moduleMetrics, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		// Deferred, to count a response cut off by a panic
		// (http.ErrAbortHandler) too, as status 0.
		defer func() {
			status := sw.status
			if p := recover(); p != nil {
				m.observe(time.Now(), time.Since(start), 0)
				panic(p)
			}
			if status == 0 {
				status = http.StatusOK
			}
			m.observe(time.Now(), time.Since(start), status)
		}()
		h.ServeHTTP(sw, r)
	})
}

// A statusWriter remembers the status of the response it writes. Unwrap
// gives http.ResponseController the writer underneath, for flushes,
// deadlines and full duplex.
type statusWriter struct {
	http.ResponseWriter
	status int // the status written; 0 before the header is
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Flush is http.Flusher's, for handlers that assert it.
func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// sampleInterval is how often sampleLoop reads the modules' memory.
const sampleInterval = time.Second

// sampleLoop records every module's memory into its metrics every
// sampleInterval until ctx ends.
func sampleLoop(ctx context.Context, modules []*module) {
	tick := time.NewTicker(sampleInterval)
	defer tick.Stop()
	for {
		for _, m := range modules {
			m.metrics.sample(time.Now(), m.h.Stats())
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
