package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
	"github.com/fbbf71ac/subproc"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// TestMain is the helper-process pattern: the test binary is also the
// modules' child, and subproc.Main runs the module there.
func TestMain(m *testing.M) {
	subproc.Main()
	// A binary built with -race sleeps a second at exit by default; the
	// children are such binaries too, and would make every restart slow.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}

// waitFor bounds every wait of the test for the dashboard to change.
const waitFor = 15 * time.Second

// testConfig is the configuration of the dashboards of the tests: a pool
// of three chaos children that are never recycled (so that pids change only
// when a test means them to), and a drain grace longer than waitFor, so
// that a drain that waits for its grace to end fails the test.
func testConfig() config {
	return config{addr: "localhost:0", poolSize: 3, drainGrace: 2 * waitFor}
}

// testDashboard is a running instance of run, and a client for it.
type testDashboard struct {
	t      *testing.T
	base   string // "http://127.0.0.1:port/"
	logdir string
	client *http.Client
	stop   func() error // cancels run's context and returns its result
}

// startDashboard runs the dashboard with cfg, on a free port and with a
// log directory of its own, until the test ends or d.stop is called.
func startDashboard(t *testing.T, cfg config) *testDashboard {
	t.Helper()
	cfg.logdir = t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	urls := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, cfg, func(url string) { urls <- url })
	}()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(2 * shutdownTimeout):
				runErr = errors.New("run did not return after its context was canceled")
			}
		})
		return runErr
	}
	t.Cleanup(func() { stop() })

	transport := &http.Transport{}
	t.Cleanup(transport.CloseIdleConnections)
	d := &testDashboard{
		t:      t,
		logdir: cfg.logdir,
		client: &http.Client{Transport: transport, Timeout: waitFor},
		stop:   stop,
	}
	select {
	case d.base = <-urls:
	case err := <-done:
		t.Fatalf("run returned before serving: %v", err)
	case <-time.After(waitFor):
		t.Fatal("run did not serve in time")
	}
	return d
}

// do sends a request and returns the status, the header and the body.
func (d *testDashboard) do(method, path string) (int, http.Header, string) {
	d.t.Helper()
	status, h, body, err := d.try(method, path)
	if err != nil {
		d.t.Fatal(err)
	}
	return status, h, body
}

// try sends a request and returns the status, the header and the body, or
// an error. Unlike do, it may be called from any goroutine.
func (d *testDashboard) try(method, path string) (int, http.Header, string, error) {
	req, err := http.NewRequest(method, d.base+strings.TrimPrefix(path, "/"), nil)
	if err != nil {
		return 0, nil, "", err
	}
	res, err := d.client.Do(req)
	if err != nil {
		return 0, nil, "", fmt.Errorf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return 0, nil, "", fmt.Errorf("%s %s: reading the body: %v", method, path, err)
	}
	return res.StatusCode, res.Header, string(body), nil
}

// expect sends a request and fails the test unless it gets status.
func (d *testDashboard) expect(method, path string, status int) string {
	d.t.Helper()
	got, _, body := d.do(method, path)
	if got != status {
		d.t.Fatalf("%s %s: status %d, want %d; body: %s", method, path, got, status, body)
	}
	return body
}

// state returns GET /api/state.
func (d *testDashboard) state() stateView {
	d.t.Helper()
	var st stateView
	if err := json.Unmarshal([]byte(d.expect("GET", "/api/state", http.StatusOK)), &st); err != nil {
		d.t.Fatalf("GET /api/state: %v", err)
	}
	return st
}

// module returns module name's status in st, failing the test if st does
// not list it.
func (d *testDashboard) module(st stateView, name string) moduleStatus {
	d.t.Helper()
	for _, ms := range st.Modules {
		if ms.Name == name {
			return ms
		}
	}
	d.t.Fatalf("GET /api/state does not list module %s: %+v", name, st.Modules)
	return moduleStatus{}
}

// waitState polls /api/state until ok(state) holds, and returns that state.
func (d *testDashboard) waitState(what string, ok func(stateView) bool) stateView {
	d.t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		st := d.state()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("%s: not within %v; last state:\n%s", what, waitFor, dump(st))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dump formats st for a failure message.
func dump(st stateView) string {
	b, _ := json.MarshalIndent(st, "", "  ")
	return string(b)
}

// serving returns the pid of each slot's child that serves (is running,
// or has failed fewer health checks than it takes to be killed), if every
// slot of ms has exactly one such child; ok is false otherwise, as while a
// slot's child restarts or is being replaced.
func serving(ms moduleStatus) (pids map[int]int, ok bool) {
	pids = make(map[int]int)
	for _, c := range ms.Children {
		switch c.State {
		case "running", "unhealthy":
		default:
			return nil, false
		}
		if _, dup := pids[c.Slot]; dup {
			return nil, false
		}
		pids[c.Slot] = c.Pid
	}
	return pids, len(pids) == ms.PoolSize
}

// waitPool waits until every slot of module name has a child that serves,
// and ok holds for their pids by slot; it returns those pids.
func (d *testDashboard) waitPool(name, what string, ok func(pids map[int]int) bool) map[int]int {
	d.t.Helper()
	var pids map[int]int
	d.waitState(what, func(st stateView) bool {
		p, full := serving(d.module(st, name))
		pids = p
		return full && ok(p)
	})
	return pids
}

// findEvent returns the newest event of st that matches kind and pid
// (0 for any), and whether there is one.
func findEvent(st stateView, module, kind string, pid int) (eventView, bool) {
	for _, e := range st.Events {
		if e.Module == module && e.Kind == kind && (pid == 0 || e.Pid == pid) {
			return e, true
		}
	}
	return eventView{}, false
}

// waitEvent waits for an event of module with kind and pid, and returns it.
func (d *testDashboard) waitEvent(module, kind string, pid int) eventView {
	d.t.Helper()
	var ev eventView
	d.waitState(fmt.Sprintf("event %s of module %s for pid %d", kind, module, pid), func(st stateView) bool {
		var ok bool
		ev, ok = findEvent(st, module, kind, pid)
		return ok
	})
	return ev
}

// helloAnswer is the chaos child's answer to GET /api/chaos/hello.
type helloAnswer struct{ Pid, Incarnation, Slot int }

// hello returns the chaos child's answer to GET /api/chaos/hello.
func (d *testDashboard) hello() helloAnswer {
	d.t.Helper()
	var v helloAnswer
	if err := json.Unmarshal([]byte(d.expect("GET", "/api/chaos/hello", http.StatusOK)), &v); err != nil {
		d.t.Fatalf("GET /api/chaos/hello: %v", err)
	}
	return v
}

// restart asks for a restart of module name, and returns the status and
// the answer.
func (d *testDashboard) restart(name string) (int, restartResult) {
	d.t.Helper()
	status, _, body := d.do("POST", "/api/modules/"+name+"/restart")
	var res restartResult
	if err := json.Unmarshal([]byte(body), &res); err != nil {
		d.t.Fatalf("POST /api/modules/%s/restart: status %d, %v; body: %s", name, status, err, body)
	}
	return status, res
}

// waitGone waits until no process has pid.
func waitGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("%s: pid %d still exists after %v", what, pid, waitFor)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// changedSlots returns the slots whose pid differs between before and after.
func changedSlots(before, after map[int]int) []int {
	var slots []int
	for slot, pid := range after {
		if before[slot] != pid {
			slots = append(slots, slot)
		}
	}
	slices.Sort(slots)
	return slots
}

func TestDashboard(t *testing.T) {
	d := startDashboard(t, testConfig())

	// Every module runs in children of its own: chaos in a pool of three,
	// one row per child.
	st := d.state()
	if len(st.Modules) != len(moduleNames) {
		t.Errorf("/api/state lists %d modules, want %d:\n%s", len(st.Modules), len(moduleNames), dump(st))
	}
	for _, name := range moduleNames {
		ms := d.module(st, name)
		if ms.State != "running" || !ms.Ready || ms.Pid == 0 || ms.Pid == os.Getpid() {
			t.Fatalf("module %s: %+v, want running and ready in a child", name, ms)
		}
	}
	chaos := d.module(st, "chaos")
	pool, full := serving(chaos)
	if chaos.PoolSize != 3 || len(chaos.Children) != 3 || !full {
		t.Fatalf("chaos: pool size %d, %d child rows (%+v), want 3 running children in slots 0, 1, 2", chaos.PoolSize, len(chaos.Children), chaos.Children)
	}
	if n := len(d.module(st, "logs").Children); n != 1 {
		t.Errorf("logs: %d child rows, want 1", n)
	}
	for _, c := range chaos.Children {
		if c.Pid == os.Getpid() || c.Started.IsZero() || c.Age == "" {
			t.Errorf("chaos child %+v: want a child of its own, with a start time and an age", c)
		}
	}
	// OnEvent delivers each child's ChildStarted after the child is
	// ready, from a goroutine of its own: a child can serve before the
	// dashboard has its event.
	for slot := range 3 {
		d.waitEvent("chaos", "ChildStarted", pool[slot])
	}
	if !st.Ready {
		t.Errorf("/api/state: ready false, want true")
	}
	if body := d.expect("GET", "/readyz", http.StatusOK); body != "ready\n" {
		t.Errorf("GET /readyz: %q, want \"ready\\n\"", body)
	}

	if body := d.expect("GET", "/", http.StatusOK); !strings.Contains(body, "/api/state") {
		t.Errorf("GET / does not serve the dashboard page: %.200s", body)
	}

	// A normal answer comes from one of the children /api/state shows.
	hi := d.hello()
	if pool[hi.Slot] != hi.Pid {
		t.Errorf("hello: %+v, want one of the pool's children %v", hi, pool)
	}

	// Route answers another method itself.
	if _, h, _ := d.do("GET", "/api/chaos/crash"); h.Get("Allow") != "POST" {
		t.Errorf("GET /api/chaos/crash: Allow %q, want POST", h.Get("Allow"))
	}

	// A panic is a 500 and the child lives on.
	d.expect("POST", "/api/chaos/panic", http.StatusInternalServerError)
	if p, _ := serving(d.module(d.state(), "chaos")); !maps.Equal(p, pool) {
		t.Errorf("after a panic, the chaos children are %v, want still %v", p, pool)
	}

	// Junk on the child's stdout goes to chaos.out, not into the protocol.
	d.expect("POST", "/api/chaos/print", http.StatusOK)
	if p, _ := serving(d.module(d.state(), "chaos")); !maps.Equal(p, pool) {
		t.Errorf("after printing junk, the chaos children are %v, want still %v", p, pool)
	}
	waitFile(t, filepath.Join(d.logdir, "chaos.out"), "fmt.Println to stdout")

	// A crash is a 502 and costs the pool one child, which a new child
	// replaces in its slot; the others serve on.
	d.expect("POST", "/api/chaos/crash", http.StatusBadGateway)
	after := d.waitPool("chaos", "a new child after a crash", func(p map[int]int) bool {
		return len(changedSlots(pool, p)) > 0
	})
	changed := changedSlots(pool, after)
	if len(changed) != 1 {
		t.Fatalf("after one crash, the chaos children went from %v to %v, want one changed", pool, after)
	}
	lost := pool[changed[0]]
	exit := d.waitEvent("chaos", "ChildExited", lost)
	if exit.Reason != "crash" || exit.Error == "" {
		t.Errorf("the crashed child's exit: %+v, want reason crash and an error", exit)
	}
	d.waitEvent("chaos", "ChildStarted", after[changed[0]])
	st = d.state()
	if ms := d.module(st, "chaos"); ms.Restarts != 1 || ms.LastExit == "" || ms.BadGateway != 1 {
		t.Errorf("after a crash: %+v, want 1 restart, a last exit and one 502", ms)
	}
	if hi := d.hello(); after[hi.Slot] != hi.Pid {
		t.Errorf("hello after a crash: %+v, want one of %v", hi, after)
	}
	pool = after

	// A child that stops itself fails its health checks and is replaced;
	// the others serve on.
	start := time.Now()
	d.expect("POST", "/api/chaos/hang", http.StatusBadGateway)
	t.Logf("a hung child was noticed and its request failed in %v", time.Since(start).Round(time.Millisecond))
	after = d.waitPool("chaos", "a new child after a hang", func(p map[int]int) bool {
		return len(changedSlots(pool, p)) > 0
	})
	if changed := changedSlots(pool, after); len(changed) != 1 {
		t.Fatalf("after one hang, the chaos children went from %v to %v, want one changed", pool, after)
	} else {
		hung := pool[changed[0]]
		d.waitEvent("chaos", "ChildUnhealthy", hung)
		if exit := d.waitEvent("chaos", "ChildExited", hung); exit.Reason != "health" {
			t.Errorf("the hung child's exit: %+v, want reason health", exit)
		}
	}
	if ms := d.module(d.state(), "chaos"); !strings.Contains(ms.LastExit, "health") {
		t.Errorf("after a hang, last exit %q, want one that names the health checks", ms.LastExit)
	}

	// The logs module serves its file's tail and follows it.
	deadline := time.Now().Add(waitFor)
	for {
		tail := d.expect("GET", "/api/logs/tail?n=2", http.StatusOK)
		lines := strings.Split(strings.TrimSuffix(tail, "\n"), "\n")
		if len(lines) == 2 && strings.Contains(lines[0], "seq=") && strings.Contains(lines[1], "seq=") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /api/logs/tail?n=2: %q, want two lines", tail)
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.expect("GET", "/api/logs/tail?n=0", http.StatusBadRequest)
	stream := openStream(t, d)
	stream.next()
	stream.close()

	// Shutting down returns nil and leaves no child behind.
	final := d.state()
	if err := d.stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, ms := range final.Modules {
		for _, c := range ms.Children {
			if err := syscall.Kill(c.Pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("module %s: child pid %d still exists after run returned (kill 0: %v)", ms.Name, c.Pid, err)
			}
		}
	}
}

// TestPoolChildKilled kills one child of the pool from outside: the event
// list shows its exit, with its last output on demand, and a new child
// takes its slot while the others keep their pids.
func TestPoolChildKilled(t *testing.T) {
	d := startDashboard(t, testConfig())
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })

	victim := pool[1]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	after := d.waitPool("chaos", "a new child in slot 1", func(p map[int]int) bool { return p[1] != victim })
	if changed := changedSlots(pool, after); !slices.Equal(changed, []int{1}) {
		t.Errorf("after killing slot 1's child, the pool went from %v to %v, want only slot 1 changed", pool, after)
	}
	exit := d.waitEvent("chaos", "ChildExited", victim)
	if exit.Error == "" || !strings.Contains(exit.Error, "kill") {
		t.Errorf("the killed child's exit: %+v, want an error that says it was killed", exit)
	}
	d.waitEvent("chaos", "ChildStarted", after[1])

	// Its last output lines are there on demand.
	if exit.OutputLines == 0 {
		t.Fatalf("the killed child's exit has no output lines: %+v", exit)
	}
	out := d.expect("GET", fmt.Sprintf("/api/events/%d/output", exit.Seq), http.StatusOK)
	if !strings.Contains(out, "chaos module started") {
		t.Errorf("the killed child's last output %q, want its log's first line", out)
	}
	d.expect("GET", fmt.Sprintf("/api/events/%d/output", exit.Seq+1000), http.StatusNotFound)
	d.expect("GET", "/api/events/x/output", http.StatusBadRequest)

	// The others kept serving throughout.
	for range 6 {
		if hi := d.hello(); after[hi.Slot] != hi.Pid {
			t.Errorf("hello: %+v, want one of %v", hi, after)
		}
	}
}

// TestRestart presses Restart for the pool: every child is replaced, one at
// a time, while requests keep succeeding, and the events show each
// replacement.
func TestRestart(t *testing.T) {
	d := startDashboard(t, testConfig())
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })

	// Clients hammer the pool throughout the restart.
	stop := make(chan struct{})
	type outcome struct {
		ok       int
		failures []string
	}
	outcomes := make(chan outcome)
	const clients = 2
	for range clients {
		go func() {
			var o outcome
			for {
				select {
				case <-stop:
					outcomes <- o
					return
				default:
				}
				status, _, body, err := d.try("GET", "/api/chaos/hello")
				switch {
				case err != nil:
					o.failures = append(o.failures, err.Error())
				case status != http.StatusOK:
					o.failures = append(o.failures, fmt.Sprintf("status %d: %s", status, body))
				default:
					o.ok++
				}
			}
		}()
	}

	status, res := d.restart("chaos")
	close(stop)
	var total outcome
	for range clients {
		o := <-outcomes
		total.ok += o.ok
		total.failures = append(total.failures, o.failures...)
	}
	if status != http.StatusOK || !res.OK || res.Error != "" || res.StartError != nil {
		t.Fatalf("POST /api/modules/chaos/restart: status %d, %+v; want 200 and ok", status, res)
	}
	t.Logf("restart took %s; %d requests succeeded meanwhile", res.Took, total.ok)
	if len(total.failures) > 0 {
		t.Errorf("%d of %d requests failed during the restart, the first: %s", len(total.failures), total.ok+len(total.failures), total.failures[0])
	}
	if total.ok == 0 {
		t.Errorf("no request was answered during the restart")
	}

	// Every child is new, and every old one is gone.
	st := d.state()
	after, full := serving(d.module(st, "chaos"))
	if !full {
		t.Fatalf("after the restart, the pool is not full:\n%s", dump(st))
	}
	if changed := changedSlots(pool, after); len(changed) != 3 {
		t.Errorf("after the restart, the pool went from %v to %v, want every pid new", pool, after)
	}
	for slot, pid := range pool {
		waitGone(t, pid, fmt.Sprintf("the old child of slot %d", slot))
		if ev := d.waitEvent("chaos", "ChildRecycling", pid); ev.Reason != "restart" {
			t.Errorf("slot %d's old child: %+v, want ChildRecycling for the reason restart", slot, ev)
		}
		d.waitEvent("chaos", "ChildExited", pid)
	}
	for _, pid := range after {
		d.waitEvent("chaos", "ChildStarted", pid)
	}
	if ms := d.module(d.state(), "chaos"); ms.Restarting || !ms.Ready || ms.BadGateway != 0 || ms.Unavailable != 0 {
		t.Errorf("after the restart: %+v, want ready, no restart under way, no 502 nor 503", ms)
	}
}

// TestRestartStartError makes the next start of a chaos child fail: Restart
// then answers with the *subproc.StartError, and the old children serve on.
func TestRestartStartError(t *testing.T) {
	d := startDashboard(t, testConfig())
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })

	d.expect("POST", "/api/chaos/fail-next-start", http.StatusOK)
	status, res := d.restart("chaos")
	if status != http.StatusInternalServerError || res.OK || res.StartError == nil {
		t.Fatalf("restart with a failing start: status %d, %+v; want 500 and a startError", status, res)
	}
	const why = "failing this start on purpose"
	if se := res.StartError; se.Module != "chaos" || !strings.Contains(se.Err, why) {
		t.Errorf("startError %+v, want module chaos and the module's own error %q", se, why)
	}
	if !strings.Contains(res.Error, `module "chaos"`) || !strings.Contains(res.Error, why) {
		t.Errorf("error %q, want one that names the module and says why", res.Error)
	}
	if !slices.ContainsFunc(res.StartError.Output, func(l string) bool { return strings.Contains(l, why) }) {
		t.Errorf("startError output %q, want the failing child's log line", res.StartError.Output)
	}

	// The old children serve on.
	st := d.state()
	if p, _ := serving(d.module(st, "chaos")); !maps.Equal(p, pool) {
		t.Errorf("after a failed restart, the chaos children are %v, want still %v", p, pool)
	}
	if !d.module(st, "chaos").Ready || d.module(st, "chaos").Restarting {
		t.Errorf("after a failed restart: %+v, want ready and no restart under way", d.module(st, "chaos"))
	}
	d.hello()

	// The failure was for one start only.
	if status, res := d.restart("chaos"); status != http.StatusOK || !res.OK {
		t.Fatalf("second restart: status %d, %+v; want 200 and ok", status, res)
	}
}

// TestRestartEndsStreams restarts the logs module while its event stream is
// open: the stream ends as the old child begins to drain, so the restart
// does not wait for the drain's grace period (longer than waitFor here).
func TestRestartEndsStreams(t *testing.T) {
	d := startDashboard(t, testConfig())
	stream := openStream(t, d)
	defer stream.close()
	stream.next()

	status, res := d.restart("logs")
	if status != http.StatusOK || !res.OK {
		t.Fatalf("POST /api/modules/logs/restart: status %d, %+v; want 200 and ok", status, res)
	}
	t.Logf("the logs module restarted in %s with a stream open", res.Took)
	stream.waitEnd()

	// A new stream reaches the new child.
	pid := d.module(d.state(), "logs").Pid
	again := openStream(t, d)
	defer again.close()
	if line := again.next(); !strings.Contains(line, fmt.Sprintf("pid=%d ", pid)) {
		t.Errorf("a new stream's first line %q, want one from the new child, pid %d", line, pid)
	}
}

// TestRecycling gives the chaos children a MaxRequests: requests beyond it
// replace a child, which the events show, and no request fails.
func TestRecycling(t *testing.T) {
	cfg := testConfig()
	cfg.maxRequests = 5
	d := startDashboard(t, cfg)
	for range 30 {
		d.hello()
	}
	ev := d.waitEvent("chaos", "ChildRecycling", 0)
	if ev.Reason != "max-requests" {
		t.Errorf("recycling: %+v, want the reason max-requests", ev)
	}
	if ms := d.module(d.state(), "chaos"); ms.BadGateway != 0 || ms.Unavailable != 0 {
		t.Errorf("after recycling: %+v, want no 502 nor 503", ms)
	}
}

// TestReadyz checks that /readyz names a module that is not ready.
func TestReadyz(t *testing.T) {
	h, err := subproc.Start(context.Background(), "chaos", subproc.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := newServer([]*module{{name: "chaos", h: h}}, new(eventRing), context.Background())
	for _, tc := range []struct {
		name   string
		status int
		body   string
	}{
		{"running", http.StatusOK, "ready\n"},
		{"shut down", http.StatusServiceUnavailable, "not ready: chaos\n"},
	} {
		if tc.name == "shut down" {
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
		}
		w := httptest.NewRecorder()
		s.serveReady(w, httptest.NewRequest("GET", "/readyz", nil))
		if w.Code != tc.status || w.Body.String() != tc.body {
			t.Errorf("%s: GET /readyz: %d %q, want %d %q", tc.name, w.Code, w.Body, tc.status, tc.body)
		}
	}
}

// TestRestartRefused checks the restarts the dashboard refuses before
// calling Handle.Restart.
func TestRestartRefused(t *testing.T) {
	busy := &module{name: "chaos"} // no handle: it must not be used
	busy.restarting.Store(true)
	s := newServer([]*module{busy}, new(eventRing), context.Background())
	mux := http.NewServeMux()
	s.register(mux)
	for _, tc := range []struct {
		path   string
		status int
		want   string
	}{
		{"/api/modules/chaos/restart", http.StatusConflict, "already under way"},
		{"/api/modules/nosuch/restart", http.StatusNotFound, `there is no module "nosuch"`},
	} {
		w := httptest.NewRecorder()
		mux.ServeHTTP(w, httptest.NewRequest("POST", tc.path, nil))
		var res restartResult
		if err := json.Unmarshal(w.Body.Bytes(), &res); err != nil {
			t.Fatalf("POST %s: %v; body %q", tc.path, err, w.Body)
		}
		if w.Code != tc.status || res.OK || !strings.Contains(res.Error, tc.want) {
			t.Errorf("POST %s: %d %+v, want %d and an error with %q", tc.path, w.Code, res, tc.status, tc.want)
		}
	}
	if !busy.restarting.Load() {
		t.Errorf("a refused restart cleared the flag of the one under way")
	}
}

// TestEventRing checks that the ring keeps the last maxEvents events,
// newest first, and their output while it keeps them.
func TestEventRing(t *testing.T) {
	var r eventRing
	const n = maxEvents + 50
	for i := 1; i <= n; i++ {
		r.add(subproc.Event{Module: "m", Kind: subproc.ChildExited, Pid: i, Output: []string{fmt.Sprint("line of ", i)}})
	}
	views := r.views()
	if len(views) != maxEvents {
		t.Fatalf("%d events kept, want %d", len(views), maxEvents)
	}
	for i, v := range views {
		if want := uint64(n - i); v.Seq != want || v.Pid != int(want) || v.Kind != "ChildExited" || v.OutputLines != 1 {
			t.Fatalf("views()[%d] = %+v, want event %d, a ChildExited with 1 output line", i, v, want)
		}
	}
	for _, tc := range []struct {
		seq  uint64
		ok   bool
		want string
	}{
		{0, false, ""},
		{n - maxEvents, false, ""},
		{n - maxEvents + 1, true, fmt.Sprintf("line of %d\n", n-maxEvents+1)},
		{n, true, fmt.Sprintf("line of %d\n", n)},
		{n + 1, false, ""},
	} {
		if got, ok := r.output(tc.seq); ok != tc.ok || got != tc.want {
			t.Errorf("output(%d) = %q, %v; want %q, %v", tc.seq, got, ok, tc.want, tc.ok)
		}
	}
}

// A stream is an open streamed response: GET /api/logs/stream, or another
// whose lines come one at a time.
type stream struct {
	t      *testing.T
	what   string // the request, as in "GET /api/logs/stream"
	res    *http.Response
	cancel context.CancelFunc
	prefix string      // what a line must begin with to count, which is cut off; "" for every line
	lines  chan string // each line, past prefix; closed at the stream's end
}

// openStream opens GET /api/logs/stream.
func openStream(t *testing.T, d *testDashboard) *stream {
	t.Helper()
	s := openLines(t, d, "GET", "/api/logs/stream", "data: ")
	if ct := s.res.Header.Get("Content-Type"); ct != "text/event-stream" {
		s.close()
		t.Fatalf("GET /api/logs/stream: content type %q", ct)
	}
	return s
}

// openLines sends a request whose answer streams, and returns the stream
// of its lines that begin with prefix.
func openLines(t *testing.T, d *testDashboard, method, path, prefix string) *stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, method, d.base+strings.TrimPrefix(path, "/"), nil)
	if err != nil {
		t.Fatal(err)
	}
	what := method + " " + path
	res, err := d.client.Transport.RoundTrip(req) // no client timeout: the stream does not end
	if err != nil {
		cancel()
		t.Fatalf("%s: %v", what, err)
	}
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cancel()
		t.Fatalf("%s: status %d: %s", what, res.StatusCode, b)
	}
	s := &stream{t: t, what: what, res: res, cancel: cancel, prefix: prefix, lines: make(chan string)}
	go s.readLoop(ctx)
	return s
}

// readLoop sends each line to s.lines until the stream ends.
func (s *stream) readLoop(ctx context.Context) {
	defer close(s.lines)
	sc := bufio.NewScanner(s.res.Body)
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), s.prefix); ok {
			select {
			case s.lines <- line:
			case <-ctx.Done():
				return
			}
		}
	}
}

// line returns the next line.
func (s *stream) line() string {
	s.t.Helper()
	select {
	case line, ok := <-s.lines:
		if !ok {
			s.t.Fatalf("%s ended without a line", s.what)
		}
		return line
	case <-time.After(waitFor):
		s.t.Fatalf("%s: no line within %v", s.what, waitFor)
		return ""
	}
}

// next returns the next event's data, which must be a line of the file.
func (s *stream) next() string {
	s.t.Helper()
	line := s.line()
	if !strings.Contains(line, "seq=") {
		s.t.Errorf("stream event %q, want a line of the file", line)
	}
	return line
}

// waitEnd waits for the stream to end by itself, skipping its lines, and
// returns the last.
func (s *stream) waitEnd() string {
	s.t.Helper()
	timeout := time.After(waitFor)
	last := ""
	for {
		select {
		case l, ok := <-s.lines:
			if !ok {
				return last
			}
			last = l
		case <-timeout:
			s.t.Fatalf("%s did not end within %v", s.what, waitFor)
		}
	}
}

// close hangs up and waits for readLoop to return.
func (s *stream) close() {
	s.cancel()
	s.res.Body.Close()
	for range s.lines {
	}
}

// waitFile waits until the file at path contains want.
func waitFile(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		b, err := os.ReadFile(path)
		if err == nil && strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not contain %q within %v (read error: %v); it holds:\n%s", path, want, waitFor, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLastLines(t *testing.T) {
	long := strings.Repeat("x", 20000) // longer than a block
	for _, tc := range []struct {
		name    string
		content string
		n       int
		want    string
	}{
		{"empty", "", 3, ""},
		{"partial line only", "abc", 3, ""},
		{"fewer lines than n", "a\nb\n", 3, "a\nb\n"},
		{"exactly n", "a\nb\nc\n", 3, "a\nb\nc\n"},
		{"more than n", "a\nb\nc\nd\n", 2, "c\nd\n"},
		{"partial last line dropped", "a\nb\nc", 1, "b\n"},
		{"lines across blocks", "a\n" + long + "\n" + long + "\nz\n", 2, long + "\nz\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f")
			if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, end, err := lastLines(f, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("lastLines(%q, %d) = %q, want %q", tc.content, tc.n, got, tc.want)
			}
			// The end is just past the last complete line.
			if want := int64(strings.LastIndexByte(tc.content, '\n') + 1); end != want {
				t.Errorf("lastLines(%q, %d): end %d, want %d", tc.content, tc.n, end, want)
			}
		})
	}
}

// limitsConfig is testConfig with the chaos module's limits: a MemoryHigh
// of 200 MiB, a MemoryMax far above it, a StuckTimeout of a second, and a
// short drain, as a stuck child's given-up handler never ends.
func limitsConfig() config {
	cfg := testConfig()
	cfg.memoryHigh = 200 << 20
	cfg.memoryMax = 2 << 30
	cfg.stuckTimeout = time.Second
	cfg.drainGrace = 2 * time.Second
	return cfg
}

// TestLeak presses "leak": the child that takes the request leaks until its
// memory, which its row shows climbing, passes MemoryHigh; then it is
// recycled for the reason memory, its leak ends, and a new child takes its
// slot.
func TestLeak(t *testing.T) {
	d := startDashboard(t, limitsConfig())
	d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })
	st := d.state()
	if ms := d.module(st, "chaos"); ms.MemoryHigh != 200<<20 || ms.MemoryMax != 2<<30 {
		t.Errorf("chaos: memory limits %d and %d in /api/state, want %d and %d", ms.MemoryHigh, ms.MemoryMax, 200<<20, 2<<30)
	}

	leak := openLines(t, d, "POST", "/api/chaos/leak?mb=100", "")
	defer leak.close()
	first := leak.line()
	var pid, slot, inc int
	if _, err := fmt.Sscanf(first, "pid %d slot %d incarnation %d:", &pid, &slot, &inc); err != nil {
		t.Fatalf("the leak's first line %q: %v", first, err)
	}

	// Its row shows the memory it takes.
	d.waitState("the leaking child's memory in its row", func(st stateView) bool {
		for _, c := range d.module(st, "chaos").Children {
			if c.Pid == pid && c.Memory > 100<<20 {
				return true
			}
		}
		return false
	})
	ev := d.waitEvent("chaos", "ChildRecycling", pid)
	if ev.Reason != "memory" {
		t.Errorf("the leaking child's recycling: %+v, want the reason memory", ev)
	}
	if last := leak.waitEnd(); !strings.Contains(last, "being replaced") {
		t.Errorf("the leak's last line %q, want one that says the child is being replaced", last)
	}
	after := d.waitPool("chaos", "a new child in the leaking child's slot", func(p map[int]int) bool { return p[slot] != pid })
	d.waitEvent("chaos", "ChildStarted", after[slot])
	d.waitEvent("chaos", "ChildExited", pid)
	if ms := d.module(d.state(), "chaos"); ms.BadGateway != 0 || ms.Restarts != 0 {
		t.Errorf("after a recycle for memory: %+v, want no 502 and no restart (a recycle is not a crash)", ms)
	}
}

// TestStuck calls /api/chaos/stuck with a short client timeout: StuckTimeout
// later the child is found stuck, its goroutine stacks are in chaos.log,
// whose path /api/state gives, and a new child takes its slot.
func TestStuck(t *testing.T) {
	d := startDashboard(t, limitsConfig())
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })

	client := &http.Client{Transport: d.client.Transport, Timeout: 500 * time.Millisecond}
	res, err := client.Post(d.base+"api/chaos/stuck", "", nil)
	if err == nil {
		res.Body.Close()
		t.Fatalf("POST /api/chaos/stuck answered %d, want no answer before the client's timeout", res.StatusCode)
	}
	ev := d.waitEvent("chaos", "ChildStuck", 0)
	if ev.Reason != "stuck" || ev.Error == "" {
		t.Errorf("ChildStuck: %+v, want the reason stuck and an error", ev)
	}
	slot := -1
	for s, pid := range pool {
		if pid == ev.Pid {
			slot = s
		}
	}
	if slot < 0 {
		t.Fatalf("ChildStuck for pid %d, not a child of the pool %v", ev.Pid, pool)
	}
	ms := d.module(d.state(), "chaos")
	if want := filepath.Join(d.logdir, "chaos.log"); ms.LogFile != want {
		t.Errorf("chaos: log file %q in /api/state, want %q", ms.LogFile, want)
	}
	waitFile(t, ms.LogFile, "goroutine ")
	waitFile(t, ms.LogFile, "chaosStuckHandler")
	if ev := d.waitEvent("chaos", "ChildRecycling", ev.Pid); ev.Reason != "stuck" {
		t.Errorf("the stuck child's recycling: %+v, want the reason stuck", ev)
	}
	d.waitPool("chaos", "a new child in the stuck child's slot", func(p map[int]int) bool { return p[slot] != ev.Pid })
}

// An sse is one server-sent event of GET /api/live.
type sse struct {
	id, kind string
	data     string
}

// openLive opens GET /api/live, with lastID as its Last-Event-ID unless "".
func openLive(t *testing.T, d *testDashboard, lastID string) (*stream, chan sse) {
	t.Helper()
	return openSSE(t, d, "/api/live", lastID)
}

// openSSE opens GET path, a text/event-stream, with lastID as its
// Last-Event-ID unless "", and returns its events.
func openSSE(t *testing.T, d *testDashboard, path, lastID string) (*stream, chan sse) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", d.base+strings.TrimPrefix(path, "/"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	res, err := d.client.Transport.RoundTrip(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if ct := res.Header.Get("Content-Type"); res.StatusCode != http.StatusOK || ct != "text/event-stream" {
		res.Body.Close()
		cancel()
		t.Fatalf("GET %s: status %d, content type %q", path, res.StatusCode, ct)
	}
	s := &stream{t: t, what: "GET " + path, res: res, cancel: cancel, lines: make(chan string)}
	go s.readLoop(ctx)
	events := make(chan sse)
	go func() {
		defer close(events)
		var e sse
		for line := range s.lines {
			switch {
			case line == "":
				if e.kind == "" && e.data != "" {
					e.kind = "message" // as EventSource names it
				}
				if e.kind != "" {
					select {
					case events <- e:
					case <-ctx.Done():
						return
					}
				}
				e = sse{}
			case strings.HasPrefix(line, "id: "):
				e.id = line[len("id: "):]
			case strings.HasPrefix(line, "event: "):
				e.kind = line[len("event: "):]
			case strings.HasPrefix(line, "data: "):
				e.data = line[len("data: "):]
			}
		}
	}()
	return s, events
}

// waitSSE reads events until ok holds for one, and returns it.
func waitSSE(t *testing.T, events chan sse, what string, ok func(sse) bool) sse {
	t.Helper()
	timeout := time.After(waitFor)
	for {
		select {
		case e, open := <-events:
			if !open {
				t.Fatalf("the stream ended while waiting for %s", what)
			}
			if ok(e) {
				return e
			}
		case <-timeout:
			t.Fatalf("the stream: no %s within %v", what, waitFor)
		}
	}
}

// liveEvent returns a function that reports whether an sse is the event of
// module with kind and pid, and keeps it in *ev.
func liveEvent(t *testing.T, module, kind string, pid int, ev *eventView) func(sse) bool {
	return func(e sse) bool {
		if e.kind != "event" {
			return false
		}
		if err := json.Unmarshal([]byte(e.data), ev); err != nil {
			t.Fatalf("GET /api/live: event %q: %v", e.data, err)
		}
		return ev.Module == module && ev.Kind == kind && (pid == 0 || ev.Pid == pid) && e.id == fmt.Sprint(ev.Seq)
	}
}

// TestLive follows GET /api/live: it pushes the events as they happen,
// numbered, the state a few times a second, with each child's state as it
// changes, and the history; a client that reconnects with Last-Event-ID gets
// only the events after it.
func TestLive(t *testing.T) {
	d := startDashboard(t, testConfig())
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })
	live, events := openLive(t, d, "")
	defer live.close()

	// The events so far, then the state.
	var ev eventView
	waitSSE(t, events, "the ChildStarted of slot 0", liveEvent(t, "chaos", "ChildStarted", pool[0], &ev))
	var st stateView
	waitSSE(t, events, "a state with the pool", func(e sse) bool {
		if e.kind != "state" {
			return false
		}
		st = stateView{}
		if err := json.Unmarshal([]byte(e.data), &st); err != nil {
			t.Fatalf("state %q: %v", e.data, err)
		}
		p, full := serving(d.module(st, "chaos"))
		return full && maps.Equal(p, pool)
	})

	// A crash shows as it happens, and the new child's row comes in a
	// state soon after.
	d.expect("POST", "/api/chaos/crash", http.StatusBadGateway)
	waitSSE(t, events, "the crashed child's ChildExited", liveEvent(t, "chaos", "ChildExited", 0, &ev))
	if ev.Reason != "crash" {
		t.Errorf("the crashed child's exit: %+v, want reason crash", ev)
	}
	crashed := ev
	waitSSE(t, events, "a state with a new child", func(e sse) bool {
		if e.kind != "state" {
			return false
		}
		st = stateView{}
		json.Unmarshal([]byte(e.data), &st)
		p, full := serving(d.module(st, "chaos"))
		return full && len(changedSlots(pool, p)) == 1
	})

	// The requests show in the history, in whole seconds.
	for range 20 {
		d.hello()
	}
	waitSSE(t, events, "20 requests in the history", func(e sse) bool {
		if e.kind != "metrics" {
			return false
		}
		var series map[string]seriesView
		if err := json.Unmarshal([]byte(e.data), &series); err != nil {
			t.Fatalf("metrics %q: %v", e.data, err)
		}
		s := series["chaos"]
		if len(s.Requests) != historySeconds || len(s.Memory) != 3 {
			t.Fatalf("chaos history: %d seconds and %d memory series, want %d and 3", len(s.Requests), len(s.Memory), historySeconds)
		}
		var n uint32
		for i, r := range s.Requests {
			n += r
			if r > 0 && (s.P50[i] <= 0 || s.P99[i] < s.P50[i]) {
				t.Fatalf("second %d: %d requests, p50 %vms, p99 %vms", i, r, s.P50[i], s.P99[i])
			}
		}
		var exits uint32
		for _, x := range s.Exits {
			exits += x
		}
		return n >= 21 && exits >= 1 && s.Memory[0][historySeconds-1] > 0 // the crash, and 20 hellos
	})

	// Reconnecting after the crash's exit gives the events after it only.
	again, events2 := openLive(t, d, fmt.Sprint(crashed.Seq))
	defer again.close()
	waitSSE(t, events2, "a first state", func(e sse) bool {
		if e.kind == "event" {
			json.Unmarshal([]byte(e.data), &ev)
			if ev.Seq <= crashed.Seq {
				t.Errorf("after Last-Event-ID %d, event %+v again", crashed.Seq, ev)
			}
		}
		return e.kind == "state"
	})
}

// TestMetrics checks the history's percentiles and its bounds.
func TestMetrics(t *testing.T) {
	m := newModuleMetrics(2)
	now := time.Unix(1_000_000, 0)
	// Out of the window, in the ring slot of a second in it.
	m.observe(now.Add(-(historySeconds+5)*time.Second), time.Hour, http.StatusOK)
	// 100 requests in one second: 98 at 1ms, 2 at 1s.
	for i := range 100 {
		d := time.Millisecond
		if i >= 98 {
			d = time.Second
		}
		m.observe(now.Add(-time.Second), d, http.StatusOK)
	}
	m.observe(now.Add(-time.Second), time.Millisecond, http.StatusBadGateway)
	m.observe(now.Add(-time.Second), time.Millisecond, 0)
	m.childEnded(now.Add(-2 * time.Second))
	m.sample(now.Add(-time.Second), subproc.Stats{Children: []subproc.ChildStats{{Slot: 1, Memory: 7}, {Slot: 1, Memory: 9}, {Slot: 5, Memory: 1}}})

	s := m.series(now)
	last := historySeconds - 1
	if s.Start != now.Unix()-historySeconds || s.Requests[last] != 102 || s.Errors[last] != 2 || s.Exits[last-1] != 1 {
		t.Errorf("series: start %d, last second %d requests, %d errors, %d exits the second before; want %d, 102, 2, 1",
			s.Start, s.Requests[last], s.Errors[last], s.Exits[last-1], now.Unix()-historySeconds)
	}
	if p50 := s.P50[last]; p50 < 1 || p50 > 1.2 {
		t.Errorf("p50 %vms, want 1ms (to the bucket's 19%%)", p50)
	}
	if p99 := s.P99[last]; p99 < 1000 || p99 > 1200 {
		t.Errorf("p99 %vms, want 1000ms (to the bucket's 19%%)", p99)
	}
	if s.Memory[1][last] != 9 || s.Memory[0][last] != 0 {
		t.Errorf("memory by slot %v %v, want the most of slot 1's children, 9, and none for slot 0", s.Memory[0][last], s.Memory[1][last])
	}
	for i := range last {
		if s.Requests[i] != 0 || s.P50[i] != -1 {
			t.Fatalf("second %d: %d requests, p50 %v; want none, -1", i, s.Requests[i], s.P50[i])
		}
	}
	for _, d := range []time.Duration{0, latencyBase, time.Millisecond, time.Hour} {
		if i := bucketOf(d); d > bucketBound(i) && i != latencyBuckets-1 || i > 0 && d <= bucketBound(i-1) {
			t.Errorf("bucketOf(%v) = %d, whose bounds are (%v, %v]", d, i, bucketBound(i-1), bucketBound(i))
		}
	}

	// The middleware sees the status, and a panic as a response cut off.
	h := measure(m, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/panic" {
			panic(http.ErrAbortHandler)
		}
		w.WriteHeader(http.StatusTeapot)
		w.(http.Flusher).Flush()
	}))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
	func() {
		defer func() {
			if p := recover(); p != http.ErrAbortHandler {
				t.Errorf("the middleware's panic: %v, want http.ErrAbortHandler passed on", p)
			}
		}()
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/panic", nil))
	}()
	s = m.series(time.Now().Add(time.Second))
	if s.Requests[last] != 2 || s.Errors[last] != 1 {
		t.Errorf("middleware: %d requests, %d errors, want 2 and 1 (the panic)", s.Requests[last], s.Errors[last])
	}
}

// TestLogResume follows the log across a restart of the logs module, as
// the page does: from the tail's offset, then, after the stream ends at the
// restart, from the last line's id, once the file has grown past it. The
// lines the two streams gave are the file's from the tail on, without a
// gap or a line twice.
func TestLogResume(t *testing.T) {
	d := startDashboard(t, testConfig())
	var from string
	d.waitState("a line in the file", func(stateView) bool {
		_, h, body := d.do("GET", "/api/logs/tail?n=1")
		from = h.Get("X-Log-Offset")
		return body != ""
	})
	start, err := strconv.ParseInt(from, 10, 64)
	if err != nil {
		t.Fatalf("X-Log-Offset %q: %v", from, err)
	}

	var got []string
	last := ""
	follow := func(s *stream, events chan sse, until func() bool) {
		defer s.close()
		for !until() {
			e := waitSSE(t, events, "a line", func(e sse) bool { return e.kind == "message" })
			got = append(got, e.data)
			last = e.id
		}
	}
	s, events := openSSE(t, d, "/api/logs/stream?from="+from, "")
	follow(s, events, func() bool { return len(got) >= 2 })
	if status, res := d.restart("logs"); status != http.StatusOK {
		t.Fatalf("restart of logs: %d %+v", status, res)
	}
	// Wait for lines the stream missed while the module restarted.
	file := filepath.Join(d.logdir, "events.txt")
	lastOff, _ := strconv.ParseInt(last, 10, 64)
	deadline := time.Now().Add(waitFor)
	for {
		fi, err := os.Stat(file)
		if err == nil && fi.Size() > lastOff+200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not grow past byte %d", file, lastOff+200)
		}
		time.Sleep(100 * time.Millisecond)
	}
	pid := d.module(d.state(), "logs").Pid
	s, events = openSSE(t, d, "/api/logs/stream?from="+from, last)
	follow(s, events, func() bool { return strings.Contains(got[len(got)-1], fmt.Sprintf("pid=%d ", pid)) && len(got) >= 5 })

	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	end, _ := strconv.ParseInt(last, 10, 64)
	want := strings.Split(strings.TrimSuffix(string(b[start:end]), "\n"), "\n")
	if !slices.Equal(got, want) {
		t.Errorf("the streams gave\n%s\nwant the file's lines from byte %d to %d:\n%s", strings.Join(got, "\n"), start, end, strings.Join(want, "\n"))
	}
}

// scrape returns GET /metrics, parsed by Prometheus's own text parser.
func (d *testDashboard) scrape() map[string]*dto.MetricFamily {
	d.t.Helper()
	body := d.expect("GET", "/metrics", http.StatusOK)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	require.NoError(d.t, err, "GET /metrics is not in the text format:\n%s", body)
	return fams
}

// metricValue returns the value of the series of family name in fams with
// the labels given as name, value pairs (and any others), failing the test
// unless exactly one series has them.
func metricValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	fam := fams[name]
	require.NotNil(t, fam, "GET /metrics has no %s", name)
	var found []*dto.Metric
	for _, m := range fam.Metric {
		have := make(map[string]string)
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		ok := true
		for i := 0; i+1 < len(labels); i += 2 {
			ok = ok && have[labels[i]] == labels[i+1]
		}
		if ok {
			found = append(found, m)
		}
	}
	require.Len(t, found, 1, "the series of %s with labels %v", name, labels)
	m := found[0]
	switch {
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	t.Fatalf("%s%v is neither a gauge nor a counter: %v", name, labels, m)
	return 0
}

// TestPrometheusMetrics scrapes GET /metrics, which the page links to: the
// chaos pool's children and requests are those /api/state shows, and a
// crash shows as a restart, an exit for the reason crash and a 502.
func TestPrometheusMetrics(t *testing.T) {
	d := startDashboard(t, testConfig())
	d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })
	assert.True(t, strings.Contains(d.expect("GET", "/", http.StatusOK), `href="/metrics"`), "the page does not link to /metrics")

	for range 5 {
		d.hello()
	}
	// The parent counts a request once its handler returns, which may be
	// just after the client has the answer.
	chaos := d.module(d.waitState("5 requests counted", func(st stateView) bool {
		return d.module(st, "chaos").Requests == 5
	}), "chaos")
	fams := d.scrape()
	running := 0
	for _, c := range chaos.Children {
		if c.State == "running" {
			running++
		}
	}
	require.Equal(t, 3, chaos.PoolSize)
	assert.Equal(t, float64(chaos.PoolSize), metricValue(t, fams, "subproc_children", "module", "chaos", "state", "running"),
		"the chaos pool's running children")
	assert.Equal(t, float64(running), metricValue(t, fams, "subproc_children", "module", "chaos", "state", "running"))
	assert.Equal(t, 1.0, metricValue(t, fams, "subproc_children", "module", "logs", "state", "running"))
	for _, name := range moduleNames {
		assert.Equal(t, 1.0, metricValue(t, fams, "subproc_ready", "module", name), "module %s ready", name)
		assert.Equal(t, 1.0, metricValue(t, fams, "subproc_module_state", "module", name, "state", "running"), "module %s running", name)
	}
	assert.Equal(t, 5.0, metricValue(t, fams, "subproc_requests_total", "module", "chaos"),
		"the chaos module's requests, as /api/state counts them")
	assert.Equal(t, 0.0, metricValue(t, fams, "subproc_restarts_total", "module", "chaos"))
	assert.Equal(t, 0.0, metricValue(t, fams, "subproc_child_exits_total", "module", "chaos", "reason", "crash"))
	for slot := range 3 {
		assert.Positive(t, metricValue(t, fams, "subproc_child_start_time_seconds", "module", "chaos", "slot", strconv.Itoa(slot)),
			"slot %d's start time", slot)
	}
	// The Go runtime's and the process's metrics are there too.
	assert.Positive(t, metricValue(t, fams, "go_goroutines"))
	assert.Positive(t, metricValue(t, fams, "process_resident_memory_bytes"))

	// A crash: a restart, an exit for the reason crash, and a 502. The
	// collector counts the event before the dashboard's list shows it.
	pool := d.waitPool("chaos", "a full pool", func(map[int]int) bool { return true })
	d.expect("POST", "/api/chaos/crash", http.StatusBadGateway)
	after := d.waitPool("chaos", "a new child after a crash", func(p map[int]int) bool { return len(changedSlots(pool, p)) == 1 })
	d.waitEvent("chaos", "ChildExited", pool[changedSlots(pool, after)[0]])
	fams = d.scrape()
	assert.Equal(t, 1.0, metricValue(t, fams, "subproc_restarts_total", "module", "chaos"))
	assert.Equal(t, 1.0, metricValue(t, fams, "subproc_child_exits_total", "module", "chaos", "reason", "crash"))
	assert.Equal(t, 1.0, metricValue(t, fams, "subproc_request_failures_total", "module", "chaos", "outcome", "bad_gateway"))
	assert.Equal(t, 3.0, metricValue(t, fams, "subproc_children", "module", "chaos", "state", "running"))
	assert.Equal(t, 0.0, metricValue(t, fams, "subproc_restarts_total", "module", "logs"))
}

// wsReceived is a message of the module's on GET /api/logs/ws: a
// wsMessage, or a wsHello.
type wsReceived struct {
	wsMessage
	Pid         int `json:"pid"`
	Incarnation int `json:"incarnation"`
}

// A logSocket is a client of GET /api/logs/ws: coder/websocket's.
type logSocket struct {
	t    *testing.T
	c    *websocket.Conn
	msgs chan wsReceived // what the module sends; closed when a read fails
	err  error           // the read's error; set before msgs is closed
}

// dialLogs opens GET /api/logs/ws?query, and reads its messages until it
// closes, or the test ends.
func dialLogs(t *testing.T, d *testDashboard, query string) *logSocket {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	url := "ws" + strings.TrimPrefix(d.base, "http") + "api/logs/ws?" + query
	hctx, hcancel := context.WithTimeout(ctx, waitFor)
	defer hcancel()
	c, _, err := websocket.Dial(hctx, url, &websocket.DialOptions{HTTPClient: d.client})
	if err != nil {
		cancel()
		t.Fatalf("dialing %s: %v", url, err)
	}
	s := &logSocket{t: t, c: c, msgs: make(chan wsReceived, 1024)}
	go s.readLoop(ctx)
	t.Cleanup(func() {
		cancel()
		c.CloseNow()
		for range s.msgs {
		}
	})
	return s
}

// readLoop sends each message to s.msgs until a read fails.
func (s *logSocket) readLoop(ctx context.Context) {
	defer close(s.msgs)
	for {
		var msg wsReceived
		if err := wsjson.Read(ctx, s.c, &msg); err != nil {
			s.err = err
			return
		}
		select {
		case s.msgs <- msg:
		case <-ctx.Done():
			s.err = ctx.Err()
			return
		}
	}
}

// next returns the next message, failing the test if the socket closes or
// none comes within waitFor.
func (s *logSocket) next() wsReceived {
	s.t.Helper()
	select {
	case msg, ok := <-s.msgs:
		if !ok {
			s.t.Fatalf("GET /api/logs/ws closed: %v", s.err)
		}
		return msg
	case <-time.After(waitFor):
		s.t.Fatalf("GET /api/logs/ws: no message within %v", waitFor)
		return wsReceived{}
	}
}

// send sends msg to the module.
func (s *logSocket) send(msg wsMessage) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(s.t, wsjson.Write(ctx, s.c, msg), "sending %+v", msg)
}

// lines reads messages, appending the lines to *got and failing the test
// at another kind, until until holds for the last line.
func (s *logSocket) lines(got *[]wsMessage, until func(wsMessage) bool) {
	s.t.Helper()
	for {
		msg := s.next()
		require.Equal(s.t, "line", msg.Type, "a message of GET /api/logs/ws: %+v", msg)
		*got = append(*got, msg.wsMessage)
		if until(msg.wsMessage) {
			return
		}
	}
}

// waitClose reads the socket until it closes, appending its lines to *got,
// and returns why it closed.
func (s *logSocket) waitClose(got *[]wsMessage) error {
	s.t.Helper()
	timeout := time.After(waitFor)
	for {
		select {
		case msg, ok := <-s.msgs:
			if !ok {
				return s.err
			}
			require.Equal(s.t, "line", msg.Type, "a message of GET /api/logs/ws: %+v", msg)
			*got = append(*got, msg.wsMessage)
		case <-timeout:
			s.t.Fatalf("GET /api/logs/ws did not close within %v", waitFor)
		}
	}
}

// TestLogWebSocket follows the log over GET /api/logs/ws, as the page does:
// the lines come in order with their offsets, a mark sent up the socket
// comes back down as a line, a restart of the logs module closes the socket
// with 1001 going away, and a new socket from the last line's next resumes
// in the new child without a gap or a line twice; so does one after the
// child is killed. A shutdown ends an open socket with 1001 too, without
// waiting for the drain's grace.
func TestLogWebSocket(t *testing.T) {
	d := startDashboard(t, testConfig())
	file := filepath.Join(d.logdir, "events.txt")
	d.waitState("three lines in the file", func(stateView) bool {
		b, _ := os.ReadFile(file)
		return strings.Count(string(b), "\n") >= 3
	})
	oldPid := d.module(d.state(), "logs").Pid

	// What the module refuses before the upgrade.
	d.expect("GET", "/api/logs/ws", http.StatusUpgradeRequired)
	d.expect("GET", "/api/logs/ws?from=x", http.StatusBadRequest)
	d.expect("GET", "/api/logs/ws?tail=0", http.StatusBadRequest)

	s := dialLogs(t, d, "tail=3")
	hello := s.next()
	require.Equal(t, "hello", hello.Type, "the first message: %+v", hello)
	assert.Equal(t, oldPid, hello.Pid, "the socket is served by the logs module's child")
	assert.Equal(t, d.module(d.state(), "logs").Incarnation, hello.Incarnation)
	assert.NotEqual(t, os.Getpid(), hello.Pid)

	var got []wsMessage
	s.lines(&got, func(wsMessage) bool { return len(got) == 3 })
	assert.Equal(t, hello.Offset, got[0].Offset, "the first line starts where hello says")

	// A mark comes back as a line, its newline a space; bad messages get
	// an error, and the socket stays open.
	s.send(wsMessage{Type: "mark", Text: "  from the\ntest  "})
	s.lines(&got, func(l wsMessage) bool { return strings.Contains(l.Text, " mark: ") })
	assert.Contains(t, got[len(got)-1].Text, fmt.Sprintf("pid=%d incarnation=", oldPid))
	assert.True(t, strings.HasSuffix(got[len(got)-1].Text, " mark: from the test"), "the mark's line %q", got[len(got)-1].Text)
	for _, bad := range []wsMessage{{Type: "mark", Text: " \n "}, {Type: "mark", Text: strings.Repeat("x", maxMark+1)}, {Type: "nosuch"}} {
		s.send(bad)
		for {
			msg := s.next()
			if msg.Type == "line" {
				got = append(got, msg.wsMessage)
				continue
			}
			require.Equal(t, "error", msg.Type, "the answer to %+v", bad)
			assert.Regexp(t, `1 to 200 characters|unknown message type "nosuch"`, msg.Text)
			break
		}
	}

	// A restart closes the socket with a close frame, 1001, and does not
	// wait for the drain's grace (longer than the client's timeout).
	restarted := make(chan restartResult, 1)
	go func() {
		// Not d.restart: it may fail the test, and this is not the
		// test's goroutine.
		var res restartResult
		status, _, body, err := d.try("POST", "/api/modules/logs/restart")
		if err == nil && status == http.StatusOK {
			err = json.Unmarshal([]byte(body), &res)
		} else if err == nil {
			res.Error = fmt.Sprintf("status %d: %s", status, body)
		}
		if err != nil {
			res.Error = err.Error()
		}
		restarted <- res
	}()
	err := s.waitClose(&got)
	assert.Equal(t, websocket.StatusGoingAway, websocket.CloseStatus(err), "the socket's end at the restart: %v", err)
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		assert.Equal(t, goingAway, ce.Reason)
	}
	res := <-restarted
	require.True(t, res.OK, "restart of logs: %+v", res)
	t.Logf("the logs module restarted in %s with a socket open", res.Took)

	// A new socket from the last line's next reaches the new child and
	// resumes there.
	newPid := d.module(d.state(), "logs").Pid
	require.NotEqual(t, oldPid, newPid)
	last := got[len(got)-1].Next
	s = dialLogs(t, d, "from="+strconv.FormatInt(last, 10))
	hello = s.next()
	require.Equal(t, "hello", hello.Type, "the first message: %+v", hello)
	assert.Equal(t, newPid, hello.Pid, "the new socket is served by the new child")
	assert.Equal(t, d.module(d.state(), "logs").Incarnation, hello.Incarnation)
	assert.Equal(t, last, hello.Offset, "the new socket starts where the old one ended")
	newLine := fmt.Sprintf("pid=%d ", newPid)
	s.lines(&got, func(l wsMessage) bool { return strings.Contains(l.Text, newLine) })
	s.send(wsMessage{Type: "mark", Text: "after the restart"})
	s.lines(&got, func(l wsMessage) bool { return strings.HasSuffix(l.Text, " mark: after the restart") })
	assert.Contains(t, got[len(got)-1].Text, newLine, "the new child appended the mark")

	// A crash of the logs child ends the socket without a close frame;
	// a new socket from the last line's next resumes in the child that
	// replaces it.
	require.NoError(t, syscall.Kill(newPid, syscall.SIGKILL))
	err = s.waitClose(&got)
	assert.Equal(t, websocket.StatusCode(-1), websocket.CloseStatus(err), "the socket's end at the crash, without a close frame: %v", err)
	d.waitEvent("logs", "ChildExited", newPid)
	var crashPid int
	d.waitState("a new logs child after the crash", func(st stateView) bool {
		ms := d.module(st, "logs")
		crashPid = ms.Pid
		return ms.Ready && ms.Pid != newPid && ms.Pid != 0
	})
	last = got[len(got)-1].Next
	s = dialLogs(t, d, "from="+strconv.FormatInt(last, 10))
	hello = s.next()
	require.Equal(t, "hello", hello.Type, "the first message: %+v", hello)
	assert.Equal(t, crashPid, hello.Pid, "the socket after the crash is served by the new child")
	assert.Equal(t, last, hello.Offset, "the socket after the crash starts where the one before ended")
	s.lines(&got, func(l wsMessage) bool { return strings.Contains(l.Text, fmt.Sprintf("pid=%d ", crashPid)) })

	// The lines of all the sockets are the file's, from the first on, each
	// once, each at its offset.
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	for i, l := range got {
		if i > 0 && l.Offset != got[i-1].Next {
			t.Fatalf("line %d starts at byte %d, the one before it ended at %d: %+v after %+v", i, l.Offset, got[i-1].Next, l, got[i-1])
		}
		require.Less(t, l.Offset, l.Next)
		require.LessOrEqual(t, l.Next, int64(len(b)))
		require.Equal(t, string(b[l.Offset:l.Next]), l.Text+"\n", "line %d against the file", i)
	}
	start, end := got[0].Offset, got[len(got)-1].Next
	want := strings.Split(strings.TrimSuffix(string(b[start:end]), "\n"), "\n")
	texts := make([]string, len(got))
	for i, l := range got {
		texts[i] = l.Text
	}
	assert.Equal(t, want, texts, "the sockets' lines against the file's from byte %d to %d", start, end)

	// A shutdown closes the socket with 1001 too; run returns nil, so the
	// drain did not wait for its grace (longer than shutdownTimeout).
	stopped := make(chan error, 1)
	go func() { stopped <- d.stop() }()
	err = s.waitClose(&got)
	assert.Equal(t, websocket.StatusGoingAway, websocket.CloseStatus(err), "the socket's end at the shutdown: %v", err)
	require.NoError(t, <-stopped, "run, with a socket open")
}
