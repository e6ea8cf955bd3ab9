package subproctest_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/fbbf71ac/subproc/subproctest"
)

// A fakeT is a testing.TB that records failures instead of failing the
// test, to test how this package fails a test. Cleanups, Context and logs
// go to the real test. Run the code under test with run.
type fakeT struct {
	testing.TB

	mu     sync.Mutex // guards the fields below
	fatal  string     // the message of Fatalf
	errors []string   // the messages of Errorf
}

func (f *fakeT) Fatalf(format string, args ...any) {
	f.mu.Lock()
	f.fatal = fmt.Sprintf(format, args...)
	f.mu.Unlock()
	runtime.Goexit()
}

func (f *fakeT) Errorf(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errors = append(f.errors, fmt.Sprintf(format, args...))
}

// run calls fn with f on a goroutine of its own, as Fatalf ends the
// goroutine, and returns the message of Fatalf, if it was called.
func (f *fakeT) run(fn func(testing.TB)) string {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fatal
}

// get returns the body of a GET of url, or fails t.
func get(t *testing.T, url string) string {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %q %v", url, res.Status, b, err)
	}
	return string(b)
}

// serve serves h for the test.
func serve(t *testing.T, h http.Handler) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// alive reports whether process pid exists.
func alive(pid int) bool { return syscall.Kill(pid, 0) != syscall.ESRCH }

func TestMainSkipsRaceExitSleep(t *testing.T) {
	if !strings.Contains(os.Getenv("GORACE"), "atexit_sleep_ms=") {
		t.Errorf("GORACE = %q after Main: no atexit_sleep_ms", os.Getenv("GORACE"))
	}
	for _, tt := range []struct {
		in, want string
		added    bool
	}{
		{"", "atexit_sleep_ms=0", true},
		{"halt_on_error=1", "halt_on_error=1 atexit_sleep_ms=0", true},
		{" log_path=/tmp/r  ", "log_path=/tmp/r atexit_sleep_ms=0", true},
		{"atexit_sleep_ms=50", "atexit_sleep_ms=50", false},
		{"halt_on_error=1 atexit_sleep_ms=0", "halt_on_error=1 atexit_sleep_ms=0", false},
	} {
		if got, added := subproctest.WithRaceNoSleep(tt.in); got != tt.want || added != tt.added {
			t.Errorf("withRaceNoSleep(%q) = %q, %v; want %q, %v", tt.in, got, added, tt.want, tt.added)
		}
	}
}

// Start starts the module and closes it at the test's end: every child is
// gone after the cleanup.
func TestStart(t *testing.T) {
	checkLeaks(t)
	var h *subproc.Handle
	var pids []int
	t.Run("test", func(t *testing.T) {
		h = subproctest.Start(t, "greeter", subproc.Options{Children: 2})
		srv := serve(t, h)
		if got := get(t, srv.URL+"/hello"); !strings.HasPrefix(got, "hello from incarnation") {
			t.Errorf("GET /hello = %q", got)
		}
		for _, c := range h.Stats().Children {
			pids = append(pids, c.Pid)
		}
	})
	if s := h.Stats(); s.State != "stopped" || len(s.Children) != 0 {
		t.Errorf("after the test: state %q, children %+v; want it stopped", s.State, s.Children)
	}
	if len(pids) != 2 {
		t.Fatalf("children %v, want 2", pids)
	}
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("child %d is alive after the test", pid)
		}
	}
}

// A module that cannot start fails the test with the *StartError; a
// TestMain that forgot Main is told what to do.
func TestStartFails(t *testing.T) {
	checkLeaks(t)
	for _, tt := range []struct {
		name string
		opts subproc.Options
		want string
	}{
		{"unregistered", subproc.Options{}, `subproctest.Start: subproc: module "unregistered" is not registered`},
		{"greeter", subproc.Options{Env: append(os.Environ(), envForgetMain+"=1")},
			`subproctest.Start: subproc: module "greeter" could not start: the child exited before it was ready (exit status 0): does main (or TestMain) call subproc.Main first? In tests, use subproctest.Main(m)`},
	} {
		f := &fakeT{TB: t}
		got := f.run(func(t testing.TB) {
			subproctest.Start(t, tt.name, tt.opts)
			t.Errorf("Start returned")
		})
		if !strings.HasPrefix(got, tt.want) {
			t.Errorf("Start(%q) failed with\n%s\nwant\n%s", tt.name, got, tt.want)
		}
	}
}

// Start's cleanup fails the test if a child outlives the Close.
func TestStartFailsIfAChildIsLeft(t *testing.T) {
	checkLeaks(t)
	h, err := subproc.Start(context.Background(), "greeter", subproc.Options{Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	// A process that outlives the Close, as if it were a child of h.
	left := exec.Command("sleep", "60")
	if err := left.Start(); err != nil {
		t.Fatal(err)
	}
	defer left.Wait()
	defer left.Process.Kill()
	f := &fakeT{TB: t}
	f.run(func(t testing.TB) { subproctest.CloseAndCheck(t, h, left.Process.Pid, 100*time.Millisecond) })
	want := fmt.Sprintf(`subproctest: module "greeter": child process %d is still running 100ms after Close`, left.Process.Pid)
	if len(f.errors) != 1 || !strings.HasPrefix(f.errors[0], want) {
		t.Errorf("errors %q, want one that begins %q", f.errors, want)
	}

	// And not if it ends.
	left.Process.Kill()
	left.Wait()
	f = &fakeT{TB: t}
	f.run(func(t testing.TB) { subproctest.CloseAndCheck(t, h, left.Process.Pid, time.Minute) })
	if len(f.errors) != 0 {
		t.Errorf("errors %q after every child ended", f.errors)
	}
}

// pidOf returns the pid of the child that serves a request.
func pidOf(t *testing.T, srv *httptest.Server) int {
	t.Helper()
	pid, err := strconv.Atoi(get(t, srv.URL+"/pid"))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// Kill kills the newest child, and returns once its replacement runs.
func TestKill(t *testing.T) {
	checkLeaks(t)
	h := subproctest.Start(t, "greeter", subproc.Options{})
	srv := serve(t, h)
	before := pidOf(t, srv)
	subproctest.Kill(t, h)
	if alive(before) {
		t.Errorf("killed child %d is alive", before)
	}
	s := h.Stats()
	if s.State != "running" || s.Incarnation != 1 || s.LastExit != "signal: killed" {
		t.Errorf("after Kill: state %q, incarnation %d, last exit %q; want running, 1, signal: killed", s.State, s.Incarnation, s.LastExit)
	}
	if after := pidOf(t, srv); after == before {
		t.Errorf("the killed child %d still serves", before)
	}
}

// In a pool, Kill kills the newest child, and the others serve on.
func TestKillPool(t *testing.T) {
	checkLeaks(t)
	h := subproctest.Start(t, "greeter", subproc.Options{Children: 2})
	var oldest, newest subproc.ChildStats
	for _, c := range h.Stats().Children {
		if c.Incarnation == 0 {
			oldest = c
		} else {
			newest = c
		}
	}
	subproctest.Kill(t, h)
	s := h.Stats()
	if len(s.Children) != 2 {
		t.Fatalf("children after Kill: %+v", s.Children)
	}
	for _, c := range s.Children {
		switch {
		case c.Pid == oldest.Pid:
			if c.Requests != 0 || c.State != "running" {
				t.Errorf("the oldest child: %+v", c)
			}
		case c.Pid == newest.Pid:
			t.Errorf("the newest child %d was not killed", c.Pid)
		case c.Slot != newest.Slot || c.Incarnation != 2:
			t.Errorf("replacement %+v, want incarnation 2 in slot %d", c, newest.Slot)
		}
	}
}

// Kill and Freeze fail the test when there is no child.
func TestFaultsWithoutChild(t *testing.T) {
	checkLeaks(t)
	h := subproctest.Start(t, "greeter", subproc.Options{})
	h.Close()
	for name, fault := range map[string]func(testing.TB){
		"Kill":   func(t testing.TB) { subproctest.Kill(t, h) },
		"Freeze": func(t testing.TB) { subproctest.Freeze(t, h) },
	} {
		f := &fakeT{TB: t}
		want := fmt.Sprintf(`subproctest.%s: module "greeter" has no running child`, name)
		if got := f.run(fault); !strings.HasPrefix(got, want) {
			t.Errorf("%s: failed with %q, want %q", name, got, want)
		}
	}
}

// Freeze stops the newest child until thaw.
func TestFreeze(t *testing.T) {
	checkLeaks(t)
	h := subproctest.Start(t, "greeter", subproc.Options{HealthInterval: time.Hour, HealthTimeout: 100 * time.Millisecond})
	srv := serve(t, h)
	pid := pidOf(t, srv)
	thaw := subproctest.Freeze(t, h)
	if runtime.GOOS == "linux" {
		if st := procState(t, pid); st != 'T' {
			t.Errorf("frozen child in state %c, want T", st)
		}
	}
	if _, err := h.HealthCheck(context.Background()); err == nil {
		t.Error("a frozen child answered a health check")
	}
	thaw()
	thaw() // idempotent
	if _, err := h.HealthCheck(context.Background()); err != nil {
		t.Errorf("after thaw: %v", err)
	}
	if got := pidOf(t, srv); got != pid {
		t.Errorf("served by %d after thaw, want %d", got, pid)
	}
}

// A frozen child fails its health checks and is replaced; thaw then does
// nothing, and the test's cleanups thaw a child the test left frozen.
func TestFreezeReplaced(t *testing.T) {
	checkLeaks(t)
	replaced := make(chan struct{}, 1)
	h := subproctest.Start(t, "greeter", subproc.Options{
		HealthInterval: 20 * time.Millisecond, HealthTimeout: 100 * time.Millisecond, HealthFailures: 2,
		OnEvent: func(e subproc.Event) {
			if e.Kind == subproc.ChildStarted && e.Incarnation == 1 {
				replaced <- struct{}{}
			}
		},
	})
	srv := serve(t, h)
	pid := pidOf(t, srv)
	thaw := subproctest.Freeze(t, h)
	select {
	case <-replaced:
	case <-time.After(time.Minute):
		t.Fatalf("the frozen child was not replaced: %+v", h.Stats())
	}
	if got := pidOf(t, srv); got == pid {
		t.Errorf("the frozen child %d still serves", pid)
	}
	thaw()
	subproctest.Freeze(t, h) // left frozen: the cleanups thaw it before Close
}

// procState returns process pid's state letter from /proc.
func procState(t *testing.T, pid int) byte {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	return s[strings.LastIndexByte(s, ')')+2]
}

// A child that failed a health check (it was frozen, and is thawed) is
// still the module's serving child, shown "unhealthy" until a check
// passes: Kill kills it. (It failed the test: "no running child".)
func TestKillAfterAFailedCheck(t *testing.T) {
	checkLeaks(t)
	h := subproctest.Start(t, "greeter", subproc.Options{HealthInterval: time.Hour, HealthTimeout: 100 * time.Millisecond})
	thaw := subproctest.Freeze(t, h)
	if _, err := h.HealthCheck(context.Background()); err == nil {
		t.Fatal("a frozen child answered a health check")
	}
	thaw()
	if st := h.Stats(); len(st.Children) != 1 || st.Children[0].State != "unhealthy" {
		t.Fatalf("after a failed check, children %+v; want one, unhealthy", st.Children)
	}
	f := &fakeT{TB: t}
	if msg := f.run(func(t testing.TB) { subproctest.Kill(t, h) }); msg != "" {
		t.Errorf("Kill failed the test: %s", msg)
	}
	if st := h.Stats(); len(st.Children) != 1 || st.Children[0].Incarnation != 1 || !strings.Contains(st.LastExit, "killed") {
		t.Errorf("after Kill: %+v", st)
	}
}
