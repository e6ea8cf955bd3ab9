package subproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain is the helper-process pattern: in a child started by Start, Main
// runs the module and never returns.
func TestMain(m *testing.M) {
	Main()
	// A binary built with -race sleeps a second at exit by default; the
	// children are such binaries too, and would make every stop slow.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}

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
	if err != nil {
		t.Fatalf("Start(%q): %v", name, err)
	}
	t.Cleanup(func() { stopAndReap(t, h) })
	return h
}

// assertReaped fails the test if a process with the pid still exists, even
// as a zombie.
func assertReaped(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("child pid %d still exists after Shutdown (kill 0: %v)", pid, err)
	}
}

// serve starts an HTTP server for h and closes it when the test ends.
func serve(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// get fetches url and returns the status and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", url, err)
	}
	return res.StatusCode, string(b)
}

// stopAndReap shuts h down, within 30 s, and checks that every child it
// started has been reaped.
func stopAndReap(t *testing.T, h *Handle) {
	t.Helper()
	pids := h.pidsStarted()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	for _, pid := range pids {
		assertReaped(t, pid)
	}
}

// startHelperParent starts this test binary again, running only the test
// named, with env set, as a parent process that a test can kill. The
// caller reads its stdout and writes its stdin; its stderr is kept.
func startHelperParent(t *testing.T, ctx context.Context, test, env string) (cmd *exec.Cmd, stdin io.WriteCloser, stdout io.ReadCloser, stderr *failLog) {
	t.Helper()
	cmd = exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), env+"=1")
	stderr = newFailLog()
	cmd.Stderr = stderr
	cmd.WaitDelay = 10 * time.Second
	var err error
	if stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if stdout, err = cmd.StdoutPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, stdin, stdout, stderr
}
