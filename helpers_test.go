package subproc

// The one shared set of test helpers of the root package: starting and
// stopping modules, fetching, waiting on Stats and on processes, a log
// sink and a small-buffer listener. Every suite uses these; a suite keeps
// only what is particular to its own modules.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fetchTimeout bounds every fetch: a request that hangs fails the test
// instead of running into the test binary's timeout.
const fetchTimeout = 30 * time.Second

// testOptions sends the module's output and the parent's records about it
// to the test's log, unless the test chose otherwise.
func testOptions(t *testing.T, opts Options) Options {
	t.Helper()
	if opts.Stderr == nil {
		opts.Stderr = testWriter{t}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	return opts
}

// testWriter sends module output to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", p)
	return len(p), nil
}

// startModule starts a module for a test and stops it when the test ends,
// checking that every child it started has been reaped.
func startModule(t *testing.T, name string, opts Options) *Handle {
	t.Helper()
	h, err := Start(context.Background(), name, testOptions(t, opts))
	require.NoError(t, err, "Start(%q)", name)
	t.Cleanup(func() { stopAndReap(t, h) })
	return h
}

// firstChild returns the oldest child of h that is not reaped: for a pool
// of one that has not restarted, its only child.
func firstChild(h *Handle) *child {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.kids[0]
}

// assertReaped fails the test if a process with the pid still exists, even
// as a zombie.
func assertReaped(t *testing.T, pid int) {
	t.Helper()
	err := syscall.Kill(pid, 0)
	assert.ErrorIs(t, err, syscall.ESRCH, "child pid %d still exists after Shutdown", pid)
}

// serve starts an HTTP server for h and closes it when the test ends.
func serve(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// serveHTTP2 starts an HTTPS server for h that speaks HTTP/2 to the
// client its Client returns, and closes it when the test ends.
func serveHTTP2(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

// fetch GETs url on the test goroutine, within fetchTimeout, and returns
// the status and body; a transport error fails the test. Goroutines other
// than the test's use fetchErr.
func fetch(t *testing.T, url string) (status int, body string) {
	t.Helper()
	res, body, err := fetchErr(url, fetchTimeout)
	require.NoError(t, err, "GET %s", url)
	return res.StatusCode, body
}

// fetchErr GETs url within timeout and returns the response, whose body
// has been read into body and closed. It may run on any goroutine.
func fetchErr(url string, timeout time.Duration) (res *http.Response, body string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, "", err
	}
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res, string(b), err
}

// stopAndReap shuts h down, within 30 s, and checks that every child it
// started has been reaped.
func stopAndReap(t *testing.T, h *Handle) {
	t.Helper()
	pids := h.pidsStarted()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	assert.NoError(t, h.Shutdown(ctx), "Shutdown")
	for _, pid := range pids {
		assertReaped(t, pid)
	}
}

// waitFor polls cond until it holds, failing the test after timeout. Use
// it only where no event can be awaited: for what another process does,
// or for the file system.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond) // no event to wait on: poll
	}
}

// fileExists returns a condition for waitFor: path exists.
func fileExists(path string) func() bool {
	return func() bool {
		_, err := os.Stat(path)
		return err == nil
	}
}

// statsHolds waits until cond holds for h's Stats and reports whether it
// did within timeout. It wakes whenever the handle installs or retires a
// child (Handle.changed), and every 20 ms for the changes that signal
// nothing (a backoff ending, a counter moving). It may run on any
// goroutine.
func statsHolds(h *Handle, timeout time.Duration, cond func(Stats) bool) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		h.mu.Lock()
		changed := h.changed
		h.mu.Unlock()
		if cond(h.Stats()) {
			return true
		}
		select {
		case <-changed:
		case <-tick.C:
		case <-timer.C:
			return cond(h.Stats())
		}
	}
}

// awaitStats waits until cond holds for h's Stats (see statsHolds),
// failing the test with what and the last Stats after timeout.
func awaitStats(t *testing.T, h *Handle, timeout time.Duration, what string, cond func(Stats) bool) {
	t.Helper()
	require.True(t, statsHolds(h, timeout, cond), "timed out after %v waiting for %s: %+v", timeout, what, h.Stats())
}

// runningInc is a Stats condition: the handle runs incarnation n.
func runningInc(n int) func(Stats) bool {
	return func(st Stats) bool { return st.Incarnation == n && st.State == "running" && st.Pid != 0 }
}

// procState returns the state letter of a process in /proc, or "" if it
// cannot be read.
func procState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "State:"); ok {
			return strings.TrimSpace(v)[:1]
		}
	}
	return ""
}

// gone reports whether a process has exited: it no longer exists, or is a
// zombie waiting for whoever must reap it (someone else, for a process
// that is not our child).
func gone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	return procState(pid) == "Z"
}

// procEntry is one process as /proc/<pid>/stat shows it.
type procEntry struct {
	pid, ppid, pgrp int
	state           string // the state letter: R, S, T, Z, …
}

// exited reports whether the process has exited: a zombie, or dead.
func (p procEntry) exited() bool { return p.state == "Z" || p.state == "X" }

// procList returns the processes in /proc whose stat could be read.
func procList() []procEntry {
	ents, _ := os.ReadDir("/proc")
	var ps []procEntry
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold anything but ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 3 {
			continue
		}
		p := procEntry{pid: pid, state: f[0]}
		p.ppid, _ = strconv.Atoi(f[1])
		p.pgrp, _ = strconv.Atoi(f[2])
		ps = append(ps, p)
	}
	return ps
}

// awaitGone waits until process pid is gone (see gone), failing the test
// after timeout.
func awaitGone(t *testing.T, pid int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !gone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still runs after %v (state %s)", pid, timeout, procState(pid))
		}
		time.Sleep(5 * time.Millisecond) // another process's fate: poll
	}
}

// logSink is a log destination, safe for concurrent writes, that tests can
// read and wait on. Its zero value is an empty sink ready to use.
type logSink struct {
	mu    sync.Mutex // guards the fields below
	buf   bytes.Buffer
	wrote chan struct{} // closed, and cleared, by the next Write; nil if nobody waits
}

// newLogSink returns an empty logSink.
func newLogSink() *logSink { return new(logSink) }

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if l.wrote != nil {
		close(l.wrote)
		l.wrote = nil
	}
	return len(p), nil
}

// String returns everything written so far.
func (l *logSink) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// await waits until the sink contains s, and reports whether it did within
// timeout.
func (l *logSink) await(s string, timeout time.Duration) bool { return l.awaitN(s, 1, timeout) }

// awaitN waits until the sink contains s n times, and reports whether it
// did within timeout.
func (l *logSink) awaitN(s string, n int, timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		l.mu.Lock()
		if strings.Count(l.buf.String(), s) >= n {
			l.mu.Unlock()
			return true
		}
		if l.wrote == nil {
			l.wrote = make(chan struct{})
		}
		wrote := l.wrote
		l.mu.Unlock()
		select {
		case <-wrote:
		case <-timer.C:
			return strings.Count(l.String(), s) >= n
		}
	}
}

// smallBufListener sets a send buffer of size bytes on every accepted TCP
// connection, so that a slow client's backpressure reaches the server soon.
type smallBufListener struct {
	net.Listener
	size int
}

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(l.size)
	}
	return c, err
}

// eventLog collects the events of a handle for a test: pass its add as
// Options.OnEvent. Its zero value is an empty log ready to use.
type eventLog struct {
	mu     sync.Mutex // guards events
	events []Event
}

// add records ev; it is an Options.OnEvent.
func (l *eventLog) add(ev Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, ev)
}

// count returns how many events of kind, with reason if not "", arrived.
func (l *eventLog) count(kind EventKind, reason string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, ev := range l.events {
		if ev.Kind == kind && (reason == "" || ev.Reason == reason) {
			n++
		}
	}
	return n
}

// kinds returns "Kind reason" for each event, in order.
func (l *eventLog) kinds() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ks []string
	for _, ev := range l.events {
		ks = append(ks, ev.Kind.String()+" "+ev.Reason)
	}
	return ks
}

// all returns the events so far, in order.
func (l *eventLog) all() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events)
}

// first returns the first event of kind.
func (l *eventLog) first(kind EventKind) Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ev := range l.events {
		if ev.Kind == kind {
			return ev
		}
	}
	return Event{}
}

// anchorGroup starts "sleep 60" in a process group of its own (or, with
// pgid > 0, in group pgid, which it then keeps from being orphaned) and
// kills it when the test ends.
func anchorGroup(t *testing.T, pgid int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pgid}
	require.NoError(t, cmd.Start(), "starting a process in process group %d", pgid)
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// A helperParent is this test binary run again as a parent of modules,
// running one test that a helper-process test kills (see
// startHelperParent).
type helperParent struct {
	t        *testing.T
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	stderr   *logSink
	lines    chan string   // the lines it prints
	quit     chan struct{} // closed once nobody reads lines any more
	readDone chan struct{} // closed when its stdout has ended
	waitErr  error         // how it ended, once kill returned
	quitOnce sync.Once
}

// startHelperParent starts this test binary again, running only the test
// named, with env set, as a parent process that a test can kill. Its
// stdout's lines arrive on lines, its stderr is kept; it is killed at the
// test's end if the test did not kill it.
func startHelperParent(t *testing.T, test, env string) *helperParent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), env+"=1")
	p := &helperParent{t: t, cmd: cmd, stderr: newLogSink(), lines: make(chan string, 16), quit: make(chan struct{}), readDone: make(chan struct{})}
	cmd.Stderr = p.stderr
	cmd.WaitDelay = 10 * time.Second
	var err error
	p.stdin, err = cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	go func() {
		defer close(p.readDone)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			case <-p.quit: // read on to the end, so that Wait returns
			}
		}
	}()
	t.Cleanup(func() {
		p.stdin.Close()
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			p.stopReading()
			cmd.Wait()
		}
	})
	return p
}

// await returns the first line the helper parent prints for which match
// is true, skipping the others (the testing package's own among them). It
// fails the test, naming what, if the helper parent ends first or prints
// none in 30s.
func (p *helperParent) await(what string, match func(line string) bool) string {
	p.t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l := <-p.lines:
			if match(l) {
				return l
			}
		case <-p.readDone:
			p.t.Fatalf("the helper parent ended before it printed %s; its stderr:\n%s", what, p.stderr)
		case <-timeout:
			p.t.Fatalf("the helper parent printed no %s in 30s; its stderr:\n%s", what, p.stderr)
		}
	}
}

// kill kills the helper parent with SIGKILL, waits until it has ended,
// keeping how in waitErr, and returns when it was killed.
func (p *helperParent) kill() time.Time {
	p.t.Helper()
	killed := time.Now()
	require.NoError(p.t, p.cmd.Process.Signal(syscall.SIGKILL))
	p.stopReading()
	p.waitErr = p.cmd.Wait()
	return killed
}

// stopReading discards what the helper parent prints from now on, and
// returns once its stdout has ended.
func (p *helperParent) stopReading() {
	p.quitOnce.Do(func() { close(p.quit) })
	<-p.readDone
}
