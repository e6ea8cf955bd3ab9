package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc"
)

// The chaos module breaks its own child process on purpose, in the ways a
// real module breaks, to show what the parent does about each. It runs in a
// pool of children: each request below reaches one of them (the least
// loaded), and only that child breaks; the others serve on.
//
//	GET  /api/chaos/hello      a normal answer: the child's pid, incarnation and slot
//	POST /api/chaos/crash      the child exits mid-request: 502, then a new
//	                           child in its slot
//	POST /api/chaos/panic      the handler panics: 500, the child lives on
//	POST /api/chaos/hang       the child stops itself (SIGSTOP): health checks
//	                           fail, the parent kills and replaces it; the
//	                           request gets 502
//	POST /api/chaos/spin?s=3   every core spins for s seconds: the parent and
//	                           the other modules stay responsive
//	POST /api/chaos/print      junk on stdout and stderr: it lands in
//	                           chaos.out and chaos.err, never in the protocol
//	POST /api/chaos/fail-next-start
//	                           the next child of the module to start fails
//	                           its start: a Restart then reports the
//	                           *subproc.StartError and the old child serves on
//	POST /api/chaos/leak?mb=50 the child allocates and holds mb MiB a second,
//	                           resident, while the request lasts, reporting
//	                           each second: past Options.MemoryHigh the
//	                           parent replaces it (reason "memory"), past
//	                           MemoryMax it kills it. Hanging up stops the
//	                           leak; what was taken stays held.
//	POST /api/chaos/stuck      a handler that ignores its context forever:
//	                           call it with a short client timeout, and
//	                           Options.StuckTimeout later the parent finds the
//	                           child stuck (ChildStuck), its goroutine stacks
//	                           land in chaos.log, and the child is replaced

func init() { subproc.Register("chaos", newChaosModule) }

// maxSpin bounds the seconds of /api/chaos/spin.
const maxSpin = 30

// Bounds of /api/chaos/leak: the rate a client may ask for, in MiB a
// second, and what a child holds at most, all leaks together, so that a
// dashboard run without a memory limit cannot exhaust the machine.
const (
	maxLeakRate = 500
	maxLeakHeld = 2 << 30
)

// leakTick is how often a leak allocates, and reportEvery how often it
// reports what it holds.
const (
	leakTick    = 100 * time.Millisecond
	reportEvery = time.Second
)

// chaosConfig is the chaos module's Options.Config, as JSON.
type chaosConfig struct {
	// FailMarker is a file whose existence fails the next start of a
	// child: the child that finds it removes it and fails. "" disables
	// /api/chaos/fail-next-start.
	FailMarker string `json:"failMarker"`
}

// newChaosModule is the chaos module's subproc.ModuleFunc.
func newChaosModule(ctx context.Context, env *subproc.Env) (http.Handler, error) {
	var cfg chaosConfig
	if len(env.Config) > 0 {
		if err := json.Unmarshal(env.Config, &cfg); err != nil {
			return nil, fmt.Errorf("bad config %q: %w", env.Config, err)
		}
	}
	// Removing the marker is what claims the failure: of children that
	// start at the same time, exactly one fails.
	if cfg.FailMarker != "" && os.Remove(cfg.FailMarker) == nil {
		env.Logger.Error("failing this start on purpose", "marker", cfg.FailMarker)
		return nil, errors.New("failing this start on purpose, as POST /api/chaos/fail-next-start asked; the next start will succeed")
	}
	env.Logger.Info("chaos module started", "incarnation", env.Incarnation, "slot", env.Slot)
	m := &chaosModule{env: env, cfg: cfg, ctx: ctx}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/chaos/hello", m.hello)
	mux.HandleFunc("POST /api/chaos/crash", m.crash)
	mux.HandleFunc("POST /api/chaos/panic", m.panic)
	mux.HandleFunc("POST /api/chaos/hang", m.hang)
	mux.HandleFunc("POST /api/chaos/spin", m.spin)
	mux.HandleFunc("POST /api/chaos/print", m.print)
	mux.HandleFunc("POST /api/chaos/fail-next-start", m.failNextStart)
	mux.HandleFunc("POST /api/chaos/leak", m.leak)
	mux.HandleFunc("POST /api/chaos/stuck", m.stuck)
	return mux, nil
}

// chaosModule holds the chaos module's handlers.
type chaosModule struct {
	env *subproc.Env    // fixed
	cfg chaosConfig     // fixed
	ctx context.Context // fixed; the ModuleFunc's: ends when the child begins to drain

	mu   sync.Mutex // guards the fields below
	held [][]byte   // what /api/chaos/leak took, held until the child ends
	size int64      // the bytes in held
}

func (m *chaosModule) hello(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"module":      m.env.Name,
		"pid":         os.Getpid(),
		"incarnation": m.env.Incarnation,
		"slot":        m.env.Slot,
	})
}

func (m *chaosModule) crash(w http.ResponseWriter, r *http.Request) {
	m.env.Logger.Warn("crashing on request: os.Exit(1)")
	os.Exit(1)
}

func (m *chaosModule) panic(w http.ResponseWriter, r *http.Request) {
	panic("chaos: a deliberate panic in a handler")
}

func (m *chaosModule) hang(w http.ResponseWriter, r *http.Request) {
	m.env.Logger.Warn("stopping the whole process with SIGSTOP")
	// A stopped process answers nothing, not even health checks, like a
	// child wedged in a system call or a deadlocked cgo library.
	if err := syscall.Kill(os.Getpid(), syscall.SIGSTOP); err != nil {
		http.Error(w, "SIGSTOP: "+err.Error(), http.StatusInternalServerError)
		return
	}
	// kill(2) only queues the signal for the process: another of its
	// threads may take it, and this goroutine may run on for a moment
	// before the whole process stops. Hang like a stuck handler until the
	// parent kills the child (or, after a SIGCONT, the client gives up).
	<-r.Context().Done()
}

func (m *chaosModule) spin(w http.ResponseWriter, r *http.Request) {
	secs := 3
	if s := r.URL.Query().Get("s"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 || v > maxSpin {
			http.Error(w, fmt.Sprintf("s must be a number of seconds from 1 to %d", maxSpin), http.StatusBadRequest)
			return
		}
		secs = v
	}
	// Spin on every core until the time is up or the client goes away.
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(secs)*time.Second)
	defer cancel()
	n := runtime.GOMAXPROCS(0)
	done := make(chan int)
	for range n {
		go func() {
			loops := 0
			for ctx.Err() == nil {
				for range 1 << 16 {
					loops++
				}
			}
			done <- loops
		}()
	}
	total := 0
	for range n {
		total += <-done
	}
	fmt.Fprintf(w, "spun %d goroutines for up to %ds (%d loops); the parent kept serving meanwhile\n", n, secs, total)
}

func (m *chaosModule) print(w http.ResponseWriter, r *http.Request) {
	// Every way a module can write to its standard output: none of it can
	// reach the protocol pipe, which Main took away from fd 1.
	fmt.Println("chaos: fmt.Println to stdout")
	fmt.Fprintln(os.Stderr, "chaos: fmt.Fprintln to stderr")
	junk := []byte("chaos: raw bytes to fd 1: \x00\x01\x02\xff\xfe gob-like \x0e\xff\x81\x03\x01\x01\n")
	syscall.Write(1, junk)
	syscall.Write(2, junk)
	m.env.Logger.Info("wrote junk to stdout and stderr")
	fmt.Fprintf(w, "wrote junk to stdout and stderr; see %s.out and %s.err in the log directory\n", m.env.Name, m.env.Name)
}

func (m *chaosModule) failNextStart(w http.ResponseWriter, r *http.Request) {
	if m.cfg.FailMarker == "" {
		http.Error(w, "chaos: no failMarker in the module's Options.Config: set one to use fail-next-start", http.StatusNotImplemented)
		return
	}
	if err := os.WriteFile(m.cfg.FailMarker, nil, 0o644); err != nil {
		http.Error(w, "chaos: "+err.Error(), http.StatusInternalServerError)
		return
	}
	m.env.Logger.Warn("the next start of a chaos child will fail", "marker", m.cfg.FailMarker)
	fmt.Fprintln(w, "the next chaos child to start will fail its start: press Restart to see the *subproc.StartError (the old child serves on), or crash a child to see the backoff")
}

// leak takes mb MiB a second (?mb=, default 50), touching every page so
// that it is resident, and holds it until the child ends. It streams a line
// a second saying what the child holds, until the client hangs up (which
// stops the leak) or the child begins to drain, as it does once its memory
// passes Options.MemoryHigh.
func (m *chaosModule) leak(w http.ResponseWriter, r *http.Request) {
	rate := 50
	if s := r.URL.Query().Get("mb"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 || v > maxLeakRate {
			http.Error(w, fmt.Sprintf("mb must be a number of MiB a second from 1 to %d", maxLeakRate), http.StatusBadRequest)
			return
		}
		rate = v
	}
	m.env.Logger.Warn("leaking on request", "mibPerSecond", rate)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	rc := http.NewResponseController(w)
	report := func(format string, args ...any) bool {
		m.mu.Lock()
		held := m.size
		m.mu.Unlock()
		fmt.Fprintf(w, "pid %d slot %d incarnation %d: holding %d MiB; ", os.Getpid(), m.env.Slot, m.env.Incarnation, held>>20)
		fmt.Fprintf(w, format+"\n", args...)
		return rc.Flush() == nil
	}
	if !report("leaking %d MiB a second", rate) {
		return
	}
	chunk := rate << 20 / int(time.Second/leakTick)
	tick := time.NewTicker(leakTick)
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case <-r.Context().Done():
			m.env.Logger.Info("leak stopped: the client hung up")
			return
		case <-m.ctx.Done():
			report("this child is being replaced: the leak stops")
			return
		case <-tick.C:
		}
		m.take(chunk)
		if time.Since(last) >= reportEvery {
			last = time.Now()
			if !report("leaking %d MiB a second", rate) {
				return
			}
		}
	}
}

// take allocates n bytes, touches each page of them so that they are
// resident, and holds them until the child ends; nothing once the child
// holds maxLeakHeld.
func (m *chaosModule) take(n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.size+int64(n) > maxLeakHeld {
		return
	}
	b := make([]byte, n)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	m.held = append(m.held, b)
	m.size += int64(n)
}

// stuck starts a handler that never returns, whatever its context says.
// Called with a short client timeout, its request is given up at once and
// the handler runs on: Options.StuckTimeout later the parent finds the
// child stuck, has it write its goroutine stacks to the module's log
// (where chaosStuckHandler shows), and replaces it.
func (m *chaosModule) stuck(w http.ResponseWriter, r *http.Request) {
	m.env.Logger.Warn("a handler that ignores its context starts; the parent should find this child stuck",
		"pid", os.Getpid(), "slot", m.env.Slot)
	chaosStuckHandler()
}

// chaosStuckHandler blocks forever. It is a function of its own so that the
// stuck child's stacks name it.
//
//go:noinline
func chaosStuckHandler() { select {} }
