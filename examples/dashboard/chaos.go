package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc"
)

// The chaos module breaks its own child process on purpose, in the ways a
// real module breaks, to show what the parent does about each:
//
//	GET  /api/chaos/hello      a normal answer: the child's pid and incarnation
//	POST /api/chaos/crash      the child exits mid-request: 502, then a restart
//	POST /api/chaos/panic      the handler panics: 500, the child lives on
//	POST /api/chaos/hang       the child stops itself (SIGSTOP): health checks
//	                           fail, the parent kills and restarts it; the
//	                           request gets 502
//	POST /api/chaos/spin?s=3   every core spins for s seconds: the parent and
//	                           the other modules stay responsive
//	POST /api/chaos/print      junk on stdout and stderr: it lands in
//	                           chaos.out and chaos.err, never in the protocol

func init() { subproc.Register("chaos", newChaosModule) }

// maxSpin bounds the seconds of /api/chaos/spin.
const maxSpin = 30

// newChaosModule is the chaos module's subproc.ModuleFunc.
func newChaosModule(ctx context.Context, env *subproc.Env) (http.Handler, error) {
	env.Logger.Info("chaos module started", "incarnation", env.Incarnation)
	m := &chaosModule{env: env}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/chaos/hello", m.hello)
	mux.HandleFunc("POST /api/chaos/crash", m.crash)
	mux.HandleFunc("POST /api/chaos/panic", m.panic)
	mux.HandleFunc("POST /api/chaos/hang", m.hang)
	mux.HandleFunc("POST /api/chaos/spin", m.spin)
	mux.HandleFunc("POST /api/chaos/print", m.print)
	return mux, nil
}

// chaosModule holds the chaos module's handlers.
type chaosModule struct {
	env *subproc.Env // fixed
}

func (m *chaosModule) hello(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"module":      m.env.Name,
		"pid":         os.Getpid(),
		"incarnation": m.env.Incarnation,
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
