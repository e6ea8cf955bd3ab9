// Package subproctest helps test the modules of a program that uses
// subproc, with real children, in the program's own tests.
//
// The test binary is the child too, so TestMain calls Main, which runs the
// module in a child and the tests in the parent:
//
//	func TestMain(m *testing.M) {
//		subproctest.Main(m)
//	}
//
// A test then starts a module with Start, which fails the test if the
// module cannot start and closes it when the test ends, and puts it under
// faults with Kill (a crash) and Freeze (a hang).
//
// Kill and Freeze need Unix signals; Freeze waits for the child to be
// stopped only on Linux (see Freeze).
package subproctest

import (
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
)

// Main is the TestMain of a package whose tests start modules. In a child
// started by subproc.Start it runs the module and exits, as subproc.Main
// does. In the test binary it makes the children skip the race detector's
// exit sleep (see below), runs the tests with m.Run, and exits with their
// status; it never returns.
//
// A binary built with -race sleeps a second at exit by default (GORACE's
// atexit_sleep_ms), and so does every child, which are such binaries too:
// each Close of a module would take a second. Main adds
// atexit_sleep_ms=0 to GORACE in the test binary's environment, which the
// children inherit (see Start for Options.Env), unless GORACE sets
// atexit_sleep_ms already; it keeps GORACE's other options. The test
// binary's own exit sleep is unchanged: it read GORACE when it started.
//
// A TestMain that needs more (goleak.VerifyTestMain, setup) calls
// subproc.Main first and sets GORACE itself, as Main does.
func Main(m *testing.M) {
	subproc.Main()
	skipRaceExitSleep()
	os.Exit(m.Run())
}

// raceNoSleep is the GORACE option that skips the exit sleep.
const raceNoSleep = "atexit_sleep_ms=0"

// skipRaceExitSleep adds raceNoSleep to GORACE, unless GORACE sets
// atexit_sleep_ms.
func skipRaceExitSleep() {
	if v, ok := withRaceNoSleep(os.Getenv("GORACE")); ok {
		os.Setenv("GORACE", v)
	}
}

// withRaceNoSleep returns the GORACE value gorace with raceNoSleep added,
// and whether it added it: not if gorace sets atexit_sleep_ms already.
func withRaceNoSleep(gorace string) (string, bool) {
	for _, opt := range strings.Fields(gorace) {
		if strings.HasPrefix(opt, "atexit_sleep_ms=") {
			return gorace, false
		}
	}
	if gorace = strings.TrimSpace(gorace); gorace != "" {
		return gorace + " " + raceNoSleep, true
	}
	return raceNoSleep, true
}

// timeout bounds each wait of this package: for the children to be gone
// after Close, for a killed child's replacement, for a child to stop.
const timeout = time.Minute

// Start starts the module name for the test t with subproc.Start, and
// returns its Handle; it fails the test (t.Fatal) with the *StartError if
// the module cannot start. Call it from the test's goroutine.
//
// When the test ends (t.Cleanup), Start closes the handle, and fails the
// test (t.Error) if a child process of the module outlives the Close: every
// child the handle started, with every restart and replacement, must be
// gone. A Close cut short by Options.ShutdownTimeout is logged, not a
// failure.
//
// Start changes opts as tests need, and leaves the rest as given:
//   - With Stderr nil and LogDir "", the module's output goes to the test's
//     log (t.Log) instead of the test binary's stderr; with Logger nil,
//     so do the parent's records about the module.
//   - With Env set (not nil) and without GORACE in it, the children get
//     the test binary's GORACE (see Main).
//   - OnEvent still sees every event: Start watches them too.
func Start(t testing.TB, name string, opts subproc.Options) *subproc.Handle {
	t.Helper()
	if opts.Stderr == nil && opts.LogDir == "" {
		opts.Stderr = logWriter{t}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logWriter{t}, nil))
	}
	opts.Env = withGORACE(opts.Env)
	tr := &tracker{pids: map[int]bool{}, changed: make(chan struct{})}
	onEvent := opts.OnEvent
	opts.OnEvent = func(e subproc.Event) {
		tr.event(e)
		if onEvent != nil {
			onEvent(e)
		}
	}
	h, err := subproc.Start(t.Context(), name, opts)
	if err != nil {
		t.Fatalf("subproctest.Start: %v", err)
	}
	tr.record(h.Stats())
	tracked.Store(h, tr)
	t.Cleanup(func() {
		defer tracked.Delete(h)
		closeAndCheck(t, h, tr, timeout)
	})
	return h
}

// closeAndCheck closes h, and fails t if a child that tr saw is still
// running wait after the Close.
func closeAndCheck(t testing.TB, h *subproc.Handle, tr *tracker, wait time.Duration) {
	t.Helper()
	tr.record(h.Stats())
	if err := h.Close(); err != nil {
		t.Logf("subproctest: %v", err)
	}
	// There is no event for a process's end that is not our child: poll.
	deadline := time.Now().Add(wait)
	for _, pid := range tr.started() {
		for alive(pid) {
			if time.Now().After(deadline) {
				t.Errorf("subproctest: module %q: child process %d is still running %v after Close; every child must end with its Handle", h.Stats().Module, pid, wait)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// withGORACE returns env with the test binary's GORACE added if env is
// not nil and has none; a copy, when it adds it.
func withGORACE(env []string) []string {
	gorace, ok := os.LookupEnv("GORACE")
	if env == nil || !ok || slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "GORACE=") }) {
		return env
	}
	return append(env[:len(env):len(env)], "GORACE="+gorace)
}

// logWriter writes what it is given to a test's log.
type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// tracked maps each *subproc.Handle that Start returned, until its
// cleanup, to its *tracker.
var tracked sync.Map

// A tracker follows the children of a Handle that Start returned, through
// its events.
type tracker struct {
	mu      sync.Mutex    // guards the fields below
	pids    map[int]bool  // every child process seen
	changed chan struct{} // closed, and replaced, at each event
}

// event records e, and wakes the waits for a change.
func (tr *tracker) event(e subproc.Event) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if e.Pid != 0 {
		tr.pids[e.Pid] = true
	}
	close(tr.changed)
	tr.changed = make(chan struct{})
}

// record records the children in s.
func (tr *tracker) record(s subproc.Stats) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, c := range s.Children {
		tr.pids[c.Pid] = true
	}
}

// started returns the pids of every child seen.
func (tr *tracker) started() []int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	pids := make([]int, 0, len(tr.pids))
	for pid := range tr.pids {
		pids = append(pids, pid)
	}
	return pids
}

// await waits until cond holds for h's Stats, or for timeout; it reports
// whether cond held. It checks again at each event of a Handle that Start
// returned, and every few milliseconds in any case (not every change of
// Stats is an event).
func await(h *subproc.Handle, cond func(subproc.Stats) bool) bool {
	var changed func() <-chan struct{}
	if v, ok := tracked.Load(h); ok {
		tr := v.(*tracker)
		changed = func() <-chan struct{} {
			tr.mu.Lock()
			defer tr.mu.Unlock()
			return tr.changed
		}
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		var wake <-chan struct{}
		if changed != nil {
			wake = changed() // before Stats, so that no event is missed
		}
		if cond(h.Stats()) {
			return true
		}
		select {
		case <-wake:
		case <-tick.C:
		case <-deadline.C:
			return cond(h.Stats())
		}
	}
}

// newest returns the newest running child of h: the one with the highest
// incarnation among those that serve (see serving).
func newest(h *subproc.Handle) (subproc.ChildStats, bool) {
	var c subproc.ChildStats
	found := false
	for _, cs := range h.Stats().Children {
		if serving(cs) && (!found || cs.Incarnation > c.Incarnation) {
			c, found = cs, true
		}
	}
	return c, found
}

// serving reports whether cs takes the module's requests: "running", or
// "unhealthy", which is a running child that failed its last health check.
func serving(cs subproc.ChildStats) bool {
	return cs.State == "running" || cs.State == "unhealthy"
}

// Kill kills the newest running child of h (the highest incarnation) with
// SIGKILL, as a crash would, and waits until the child is reaped and a new
// child, of a higher incarnation, runs in its slot. It fails the test
// (t.Fatal) if h has no running child, or if no replacement runs within a
// minute. Call it from the test's goroutine. A running child is one in
// state "running" or "unhealthy" (it failed its last health check, and
// still serves).
//
// The requests the child was serving fail as the module's requests fail at
// a crash: 502 Bad Gateway, or an aborted response.
func Kill(t testing.TB, h *subproc.Handle) {
	t.Helper()
	c, ok := newest(h)
	if !ok {
		t.Fatalf("subproctest.Kill: module %q has no running child to kill (state %q)", h.Stats().Module, h.Stats().State)
	}
	if err := signal(c.Pid, syscall.SIGKILL); err != nil {
		t.Fatalf("subproctest.Kill: module %q: killing child process %d: %v", h.Stats().Module, c.Pid, err)
	}
	replaced := func(s subproc.Stats) bool {
		gone, next := true, false
		for _, cs := range s.Children {
			gone = gone && cs.Pid != c.Pid
			next = next || (cs.Slot == c.Slot && cs.Incarnation > c.Incarnation && serving(cs))
		}
		return gone && next
	}
	if !await(h, replaced) {
		s := h.Stats()
		t.Fatalf("subproctest.Kill: module %q: child process %d (incarnation %d, slot %d) was killed, but no new child runs in its slot after %v: state %q, last exit %q, children %+v",
			s.Module, c.Pid, c.Incarnation, c.Slot, timeout, s.State, s.LastExit, s.Children)
	}
}

// Freeze stops the newest running child of h (the highest incarnation)
// with SIGSTOP, as a hang that nothing inside the child can detect, and
// returns a function that resumes it with SIGCONT. It fails the test
// (t.Fatal) if h has no running child. Call it from the test's goroutine.
//
// On Linux, Freeze returns once the child is stopped; elsewhere, once the
// signal is sent. The child's requests stall; after Options.HealthFailures
// failed health checks the parent kills it and starts another.
//
// thaw may be called any number of times; it does nothing after the first
// call, or once the child is gone. Freeze thaws the child when the test
// ends too (t.Cleanup), before a Start's cleanup closes the handle.
func Freeze(t testing.TB, h *subproc.Handle) (thaw func()) {
	t.Helper()
	c, ok := newest(h)
	if !ok {
		t.Fatalf("subproctest.Freeze: module %q has no running child to freeze (state %q)", h.Stats().Module, h.Stats().State)
	}
	var once sync.Once
	thaw = func() {
		once.Do(func() {
			// Not once it is reaped: the pid may be another process's.
			if slices.ContainsFunc(h.Stats().Children, func(cs subproc.ChildStats) bool { return cs.Pid == c.Pid }) {
				signal(c.Pid, syscall.SIGCONT)
			}
		})
	}
	if err := signal(c.Pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("subproctest.Freeze: module %q: stopping child process %d: %v", h.Stats().Module, c.Pid, err)
	}
	t.Cleanup(thaw)
	if err := awaitStopped(c.Pid, timeout); err != nil {
		t.Fatalf("subproctest.Freeze: module %q: child process %d: %v", h.Stats().Module, c.Pid, err)
	}
	return thaw
}

// signal sends sig to the process pid.
func signal(pid int, sig syscall.Signal) error {
	if err := syscall.Kill(pid, sig); err != nil {
		return fmt.Errorf("sending %v: %w", sig, err)
	}
	return nil
}

// alive reports whether a process with pid exists (it may be a zombie).
func alive(pid int) bool {
	return syscall.Kill(pid, 0) != syscall.ESRCH
}
