package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
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

// dashboard is a running instance of run, and a client for it.
type dashboard struct {
	t      *testing.T
	base   string // "http://127.0.0.1:port/"
	logdir string
	client *http.Client
	stop   func() error // cancels run's context and returns its result
}

// startDashboard runs the dashboard on a free port until the test ends or
// d.stop is called.
func startDashboard(t *testing.T) *dashboard {
	t.Helper()
	logdir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	urls := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, "localhost:0", logdir, func(url string) { urls <- url })
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
	d := &dashboard{
		t:      t,
		logdir: logdir,
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
func (d *dashboard) do(method, path string) (int, http.Header, string) {
	d.t.Helper()
	req, err := http.NewRequest(method, d.base+strings.TrimPrefix(path, "/"), nil)
	if err != nil {
		d.t.Fatal(err)
	}
	res, err := d.client.Do(req)
	if err != nil {
		d.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		d.t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return res.StatusCode, res.Header, string(body)
}

// expect sends a request and fails the test unless it gets status.
func (d *dashboard) expect(method, path string, status int) string {
	d.t.Helper()
	got, _, body := d.do(method, path)
	if got != status {
		d.t.Fatalf("%s %s: status %d, want %d; body: %s", method, path, got, status, body)
	}
	return body
}

// modules returns GET /api/modules by module name.
func (d *dashboard) modules() map[string]moduleStatus {
	d.t.Helper()
	var list []moduleStatus
	if err := json.Unmarshal([]byte(d.expect("GET", "/api/modules", http.StatusOK)), &list); err != nil {
		d.t.Fatalf("GET /api/modules: %v", err)
	}
	m := make(map[string]moduleStatus)
	for _, ms := range list {
		m[ms.Name] = ms
	}
	return m
}

// waitModule polls /api/modules until module's status satisfies ok.
func (d *dashboard) waitModule(module, what string, ok func(moduleStatus) bool) moduleStatus {
	d.t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		ms := d.modules()[module]
		if ok(ms) {
			return ms
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("module %s: %s: not within %v; last status %+v", module, what, waitFor, ms)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hello returns the chaos child's answer to GET /api/chaos/hello.
func (d *dashboard) hello() (pid, incarnation int) {
	d.t.Helper()
	var v struct{ Pid, Incarnation int }
	if err := json.Unmarshal([]byte(d.expect("GET", "/api/chaos/hello", http.StatusOK)), &v); err != nil {
		d.t.Fatalf("GET /api/chaos/hello: %v", err)
	}
	return v.Pid, v.Incarnation
}

func TestDashboard(t *testing.T) {
	d := startDashboard(t)

	// Every module runs, in a child of its own.
	mods := d.modules()
	for _, name := range moduleNames {
		ms, ok := mods[name]
		switch {
		case !ok:
			t.Fatalf("/api/modules does not list %s: %+v", name, mods)
		case ms.State != "running" || ms.Pid == 0 || ms.Pid == os.Getpid():
			t.Fatalf("module %s: %+v, want running in a child", name, ms)
		}
	}
	if len(mods) != len(moduleNames) {
		t.Errorf("/api/modules lists %d modules, want %d: %+v", len(mods), len(moduleNames), mods)
	}

	if body := d.expect("GET", "/", http.StatusOK); !strings.Contains(body, "/api/modules") {
		t.Errorf("GET / does not serve the dashboard page: %.200s", body)
	}

	// A normal answer comes from the child /api/modules shows.
	pid, inc := d.hello()
	if pid != mods["chaos"].Pid || inc != 0 {
		t.Errorf("hello: pid %d incarnation %d, want pid %d incarnation 0", pid, inc, mods["chaos"].Pid)
	}

	// Route answers another method itself.
	if _, h, _ := d.do("GET", "/api/chaos/crash"); h.Get("Allow") != "POST" {
		t.Errorf("GET /api/chaos/crash: Allow %q, want POST", h.Get("Allow"))
	}

	// A panic is a 500 and the child lives on.
	d.expect("POST", "/api/chaos/panic", http.StatusInternalServerError)
	if p, _ := d.hello(); p != pid {
		t.Errorf("after a panic, the chaos child is pid %d, want still %d", p, pid)
	}

	// Junk on the child's stdout goes to chaos.out, not into the protocol.
	d.expect("POST", "/api/chaos/print", http.StatusOK)
	if p, _ := d.hello(); p != pid {
		t.Errorf("after printing junk, the chaos child is pid %d, want still %d", p, pid)
	}
	waitFile(t, filepath.Join(d.logdir, "chaos.out"), "fmt.Println to stdout")

	// A crash is a 502, and a new child takes over.
	d.expect("POST", "/api/chaos/crash", http.StatusBadGateway)
	ms := d.waitModule("chaos", "restarted after a crash", func(ms moduleStatus) bool {
		return ms.State == "running" && ms.Incarnation == 1
	})
	if ms.Pid == pid || ms.Restarts != 1 || ms.LastExit == "" {
		t.Errorf("after a crash: %+v, want a new pid, 1 restart and a last exit", ms)
	}
	if p, inc := d.hello(); p != ms.Pid || inc != 1 {
		t.Errorf("hello after a crash: pid %d incarnation %d, want pid %d incarnation 1", p, inc, ms.Pid)
	}

	// A child that stops itself fails its health checks and is replaced.
	start := time.Now()
	d.expect("POST", "/api/chaos/hang", http.StatusBadGateway)
	t.Logf("a hung child was noticed and its request failed in %v", time.Since(start).Round(time.Millisecond))
	ms = d.waitModule("chaos", "restarted after a hang", func(ms moduleStatus) bool {
		return ms.State == "running" && ms.Incarnation >= 2
	})
	if !strings.Contains(ms.LastExit, "health") {
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
	readEvent(t, d)

	// Shutting down returns nil and leaves no child behind.
	final := d.modules()
	if err := d.stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	for name, ms := range final {
		if err := syscall.Kill(ms.Pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("module %s: child pid %d still exists after run returned (kill 0: %v)", name, ms.Pid, err)
		}
	}
}

// readEvent reads one event of GET /api/logs/stream, then hangs up.
func readEvent(t *testing.T, d *dashboard) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", d.base+"api/logs/stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := d.client.Transport.RoundTrip(req) // no client timeout: the stream does not end
	if err != nil {
		t.Fatalf("GET /api/logs/stream: %v", err)
	}
	defer res.Body.Close()
	if ct := res.Header.Get("Content-Type"); res.StatusCode != http.StatusOK || ct != "text/event-stream" {
		t.Fatalf("GET /api/logs/stream: status %d, content type %q", res.StatusCode, ct)
	}
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			if !strings.Contains(line, "seq=") {
				t.Errorf("stream event %q, want a line of the file", line)
			}
			return
		}
	}
	t.Fatalf("GET /api/logs/stream ended without an event: %v", sc.Err())
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
			got, err := lastLines(f, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("lastLines(%q, %d) = %q, want %q", tc.content, tc.n, got, tc.want)
			}
		})
	}
}
