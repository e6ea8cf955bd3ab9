package subproc

// End-to-end tests of failure handling: crashes, kills, hangs, restarts with
// backoff, shutdown, orphans, process groups and failed starts. They run real
// children (re-execs of the test binary) of the fail- modules registered
// below.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.org/x/sync/errgroup"
)

// failConfig is what the fail- modules read from Env.Config.
type failConfig struct {
	Dir              string        // where the module records its starts and its pid; "" for nowhere
	RestartInitSleep time.Duration // a restarted incarnation (≥ 1) sleeps this long in its ModuleFunc
	RestartInitFail  bool          // a restarted incarnation's ModuleFunc fails
}

// Errors and output of the modules that fail to start, asserted on in the
// parent.
const (
	failInitErrorText  = "cannot open the frobnicator database"
	failInitPanicText  = "the flux capacitor is empty"
	failInitExitText   = "fail-init-exit: giving up with status 5"
	failInitStdoutText = "fail-init-stdout: a stray line on stdout"
)

func init() {
	Register("fail-mod", failModule)
	Register("fail-twin-a", failModule)
	Register("fail-twin-b", failModule)
	Register("fail-init-error", func(ctx context.Context, env *Env) (http.Handler, error) {
		failRecordPid(env)
		return nil, errors.New(failInitErrorText)
	})
	Register("fail-init-panic", func(ctx context.Context, env *Env) (http.Handler, error) {
		failRecordPid(env)
		panic(failInitPanicText)
	})
	Register("fail-init-exit", func(ctx context.Context, env *Env) (http.Handler, error) {
		failRecordPid(env)
		fmt.Fprintln(os.Stderr, failInitExitText)
		os.Exit(5)
		return nil, nil
	})
	Register("fail-init-hang", func(ctx context.Context, env *Env) (http.Handler, error) {
		failRecordPid(env)
		for {
			time.Sleep(time.Hour) // a ModuleFunc that never returns
		}
	})
	Register("fail-init-stdout", func(ctx context.Context, env *Env) (http.Handler, error) {
		fmt.Println(failInitStdoutText + " (fmt.Println)")
		os.Stdout.WriteString(failInitStdoutText + " (os.Stdout)\n")
		syscall.Write(1, []byte(failInitStdoutText+" (fd 1)\n"))
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "ok")
		}), nil
	})
}

// failReadConfig decodes env.Config; an empty Config is the zero failConfig.
func failReadConfig(env *Env) (failConfig, error) {
	var cfg failConfig
	if len(env.Config) == 0 {
		return cfg, nil
	}
	err := json.Unmarshal(env.Config, &cfg)
	return cfg, err
}

// failRecordPid writes the child's pid to <Dir>/pid, so that the test can
// check the child is gone after a failed start.
func failRecordPid(env *Env) {
	cfg, err := failReadConfig(env)
	if err != nil || cfg.Dir == "" {
		return
	}
	os.WriteFile(filepath.Join(cfg.Dir, "pid"), []byte(strconv.Itoa(os.Getpid())), 0o644)
}

// failModule is a module whose endpoints misbehave on request.
func failModule(ctx context.Context, env *Env) (http.Handler, error) {
	cfg, err := failReadConfig(env)
	if err != nil {
		return nil, err
	}
	if cfg.Dir != "" {
		// One line per incarnation: "<incarnation> <pid> <unix nanoseconds>".
		f, err := os.OpenFile(filepath.Join(cfg.Dir, "starts"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(f, "%d %d %d\n", env.Incarnation, os.Getpid(), time.Now().UnixNano())
		f.Close()
	}
	if env.Incarnation > 0 {
		time.Sleep(cfg.RestartInitSleep)
		if cfg.RestartInitFail {
			return nil, fmt.Errorf("fail-mod: incarnation %d refuses to start", env.Incarnation)
		}
	}
	// touch creates <Dir>/name: the test polls for it to learn that a
	// request reached the module.
	touch := func(name string) {
		if cfg.Dir != "" {
			os.WriteFile(filepath.Join(cfg.Dir, name), nil, 0o644)
		}
	}
	unsilence := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/inc", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "inc=%d pid=%d", env.Incarnation, os.Getpid())
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "inc=%d id=%s", env.Incarnation, r.URL.Query().Get("id"))
	})
	mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		os.Exit(3)
	})
	// /hints-exit sends a 103 with header fields of its own, then dies.
	mux.HandleFunc("/hints-exit", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.Header().Set("Cache-Control", "public, max-age=86400")
		w.WriteHeader(http.StatusEarlyHints)
		os.Exit(3)
	})
	// /block answers nothing until the request is canceled.
	mux.HandleFunc("/block", func(w http.ResponseWriter, r *http.Request) {
		touch("block")
		<-r.Context().Done()
	})
	// /silent ignores its context, and answers nothing until /unsilence,
	// or 30s.
	mux.HandleFunc("/silent", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-unsilence:
		case <-time.After(30 * time.Second):
		}
	})
	mux.HandleFunc("/unsilence", func(w http.ResponseWriter, r *http.Request) {
		close(unsilence)
	})
	// /silent-after-head starts its response, then is /silent.
	mux.HandleFunc("/silent-after-head", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial\n")
		w.(http.Flusher).Flush()
		select {
		case <-unsilence:
		case <-time.After(30 * time.Second):
		}
	})
	// /stream starts its response, then waits for the request's end.
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	// /drip streams numbered lines until the request ends.
	mux.HandleFunc("/drip", func(w http.ResponseWriter, r *http.Request) {
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(w, "inc%d-%d\n", env.Incarnation, i); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	})
	// /hold?file=x sends "part1\n", waits for <Dir>/x to exist, then
	// sends "part2\n".
	mux.HandleFunc("/hold", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "part1\n")
		w.(http.Flusher).Flush()
		name := filepath.Join(cfg.Dir, r.URL.Query().Get("file"))
		for {
			if _, err := os.Stat(name); err == nil {
				break
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
		io.WriteString(w, "part2\n")
	})
	// /forever starts its response and never returns, whatever happens.
	mux.HandleFunc("/forever", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "started\n")
		w.(http.Flusher).Flush()
		for {
			time.Sleep(time.Hour)
		}
	})
	// /stop?mark=m logs m, then stops the whole child with SIGSTOP.
	mux.HandleFunc("/stop", func(w http.ResponseWriter, r *http.Request) {
		mark := r.URL.Query().Get("mark")
		env.Logger.Info("stopping myself", "mark", mark)
		fmt.Fprintf(os.Stderr, "stderr before SIGSTOP: %s\n", mark)
		syscall.Kill(os.Getpid(), syscall.SIGSTOP)
		<-r.Context().Done()
	})
	return mux, nil
}

// withConfig returns opts with cfg, as JSON, as its Config.
func withConfig(t *testing.T, cfg any, opts Options) Options {
	t.Helper()
	b, err := json.Marshal(cfg)
	require.NoError(t, err)
	opts.Config = b
	return opts
}

// failOpts returns opts for a test, with cfg as its Config and the parent's
// log in the test log unless opts has a Logger.
func failOpts(t *testing.T, cfg failConfig, opts Options) Options {
	t.Helper()
	opts = withConfig(t, cfg, opts)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	return opts
}

// failOpen GETs url, checks that the response is a 200 whose body starts
// with first, and returns it with the rest of the body unread. The body is
// closed when the test ends.
func failOpen(t *testing.T, url, first string) *http.Response {
	t.Helper()
	res, err := http.Get(url)
	require.NoError(t, err, "GET %s", url)
	t.Cleanup(func() { res.Body.Close() })
	require.Equal(t, http.StatusOK, res.StatusCode, "GET %s: status %d, want 200", url, res.StatusCode)
	buf := make([]byte, len(first))
	if _, err := io.ReadFull(res.Body, buf); err != nil || string(buf) != first {
		t.Fatalf("GET %s: body starts %q (%v), want %q", url, buf, err, first)
	}
	return res
}

// failBody is what reading the rest of a response body gave.
type failBody struct {
	data []byte
	err  error
}

// failReadAll reads what is left of body in a goroutine and delivers the
// outcome on the returned channel.
func failReadAll(body io.Reader) <-chan failBody {
	c := make(chan failBody, 1)
	go func() {
		b, err := io.ReadAll(body)
		c <- failBody{b, err}
	}()
	return c
}

// failAwaitBody waits for a failReadAll outcome.
func failAwaitBody(t *testing.T, c <-chan failBody, what string) failBody {
	t.Helper()
	select {
	case b := <-c:
		return b
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: the body neither ended nor was aborted within 30s", what)
		return failBody{}
	}
}

func TestFailCrashNoticedAtOnce(t *testing.T) {
	// Health checks are an hour apart: only noticing the exit itself can
	// fail the requests and restart the module within the test.
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid

	// A request whose response has started when the child dies.
	started := failOpen(t, srv.URL+"/stream", "partial\n")
	rest := failReadAll(started.Body)

	res, body, err := fetchErr(srv.URL+"/exit", 30*time.Second)
	require.NoError(t, err, "GET /exit: %v (the child's exit was not noticed)", err)
	assert.Equal(t, http.StatusBadGateway, res.StatusCode, "GET /exit: status %d, want 502 (body %q)", res.StatusCode, body)
	b := failAwaitBody(t, rest, "GET /stream")
	assert.Error(t, b.err, "GET /stream: body ended cleanly with %q after the child died; want an aborted body", b.data)

	code, body := fetch(t, srv.URL+"/inc")
	assert.Equal(t, http.StatusOK, code, "GET /inc after the crash: %d %q, want 200 from incarnation 1", code, body)
	assert.True(t, strings.HasPrefix(body, "inc=1 "), "GET /inc after the crash: %d %q, want 200 from incarnation 1", code, body)
	st := h.Stats()
	assert.Equal(t, 1, st.Incarnation, "after the crash: Stats = %+v, want incarnation 1 with a new pid (old %d)", st, pid0)
	assert.NotZero(t, st.Pid, "after the crash: Stats = %+v, want incarnation 1 with a new pid (old %d)", st, pid0)
	assert.NotEqual(t, pid0, st.Pid, "after the crash: Stats = %+v, want incarnation 1 with a new pid (old %d)", st, pid0)
	assert.Equal(t, fmt.Sprintf("inc=1 pid=%d", st.Pid), body, "GET /inc answered %q, not by the new child pid %d", body, st.Pid)
	assert.Contains(t, st.LastExit, "exit status 3", "Stats().LastExit = %q, want it to mention exit status 3", st.LastExit)
	assertReaped(t, pid0)
}

// The parent's 502 for a child that died after a 1xx head carries the
// header the request came with, not the fields the module set for its 1xx
// head: a Cache-Control on a gateway error would let a cache keep it.
func TestFailAfterInformationalHead(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Middleware", "yes")
		h.ServeHTTP(w, r)
	}))
	res, body, err := fetchErr(srv.URL+"/hints-exit", 30*time.Second)
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadGateway, res.StatusCode, "body %q", body)
	assert.Equal(t, "yes", res.Header.Get("X-Middleware"))
	assert.Empty(t, res.Header.Get("Cache-Control"))
	assert.Empty(t, res.Header.Get("Link"))
}

// cancelOnWrite is a ResponseWriter that cancels the request's context
// after the first write to it.
type cancelOnWrite struct {
	http.ResponseWriter
	cancel context.CancelFunc
}

func (w cancelOnWrite) Write(p []byte) (int, error) {
	defer w.cancel()
	return w.ResponseWriter.Write(p)
}

func (w cancelOnWrite) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// A response whose request's context ends after it started (a middleware
// cancels it, or net/http does when an HTTP/1 client half-closes its
// connection) ends as its handler ends it, as in-process: the client, which
// may still be reading, gets what the handler wrote, whole. (It used to be
// cut: the child failed the handler's writes once its context ended.)
func TestFailCanceledAfterStart(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	mw := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		h.ServeHTTP(cancelOnWrite{w, cancel}, r.WithContext(ctx))
	})
	for _, http2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("HTTP/2 %v", http2), func(t *testing.T) {
			srv := httptest.NewUnstartedServer(mw)
			srv.EnableHTTP2 = http2
			srv.StartTLS()
			t.Cleanup(srv.Close)
			res, err := srv.Client().Get(srv.URL + "/stream")
			require.NoError(t, err)
			defer res.Body.Close()
			got, err := io.ReadAll(res.Body)
			assert.NoError(t, err, "the response read %q and failed", got)
			assert.Equal(t, "partial\n", string(got))
		})
	}
}

// halfClosedConn dials addr, sends a GET for path that asks to close the
// connection after its response, and half-closes the connection, as
// "nc -N" does: the server reads EOF after the request.
func halfClosedConn(addr, path string) (*net.TCPConn, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c := conn.(*net.TCPConn)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err = fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", path); err == nil {
		err = c.CloseWrite()
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// halfClosedGet sends a GET for path to addr, half-closes the connection,
// and returns what the server sends until it closes its side, with the
// error that ended the read of the response's body.
func halfClosedGet(t *testing.T, addr, path string) (*http.Response, string, error) {
	t.Helper()
	conn, err := halfClosedConn(addr, path)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "GET %s: reading the response head", path)
	b, err := io.ReadAll(res.Body)
	return res, string(b), err
}

// A client that half-closed its connection reads on (see
// TestParityContextHalfClosedClient), but a module that ignores its
// context and answers nothing holds the parent no longer than the grace
// after the context's end: the client then gets a 503 that says so, or,
// if the response had started, sees it cut. The requests are given up,
// their handlers counted as running on (see Options.StuckTimeout).
func TestFailHalfClosedClientSilentModule(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	addr := srv.Listener.Addr().String()

	start := time.Now()
	res, body, err := halfClosedGet(t, addr, "/silent")
	waited := time.Since(start)
	require.NoError(t, err)
	assert.Equal(t, http.StatusServiceUnavailable, res.StatusCode, body)
	assert.Contains(t, body, fmt.Sprintf("request canceled (context canceled), and no answer from the module came in the %v after", cancelGrace))
	assert.GreaterOrEqual(t, waited, cancelGrace, "the 503 came before the grace was over")

	res, body, err = halfClosedGet(t, addr, "/silent-after-head")
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Equal(t, "partial\n", body)
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "the started response should be cut")

	c := firstChild(h)
	_, n := c.givenUpSince()
	assert.Equal(t, 2, n, "the requests whose handlers run on should be given up")
	code, body := fetch(t, srv.URL+"/unsilence")
	require.Equal(t, http.StatusOK, code, body)
	waitFor(t, 10*time.Second, "the handlers' ends", func() bool { _, n := c.givenUpSince(); return n == 0 })
}

func TestFailSIGKILLDuringRequest(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "fail-mod", failOpts(t, failConfig{Dir: dir}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid

	type result struct {
		code int
		body string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		res, body, err := fetchErr(srv.URL+"/block", 30*time.Second)
		if err != nil {
			done <- result{err: err}
			return
		}
		done <- result{res.StatusCode, body, nil}
	}()
	waitFor(t, 10*time.Second, "the request to reach the module", fileExists(filepath.Join(dir, "block")))
	require.NoError(t, syscall.Kill(pid0, syscall.SIGKILL))
	r := <-done
	switch {
	case r.err != nil:
		t.Errorf("GET /block: %v, want a 502 (its response had not started)", r.err)
	case r.code != http.StatusBadGateway:
		t.Errorf("GET /block: %d %q, want 502", r.code, r.body)
	}

	code, body := fetch(t, srv.URL+"/inc")
	assert.Equal(t, http.StatusOK, code, "GET /inc after SIGKILL: %d %q, want 200 from incarnation 1", code, body)
	assert.True(t, strings.HasPrefix(body, "inc=1 "), "GET /inc after SIGKILL: %d %q, want 200 from incarnation 1", code, body)
	if st := h.Stats(); st.Incarnation != 1 || st.Pid == pid0 || st.Restarts != 1 {
		t.Errorf("after SIGKILL: Stats = %+v, want incarnation 1, one restart, a new pid (old %d)", st, pid0)
	}
	assertReaped(t, pid0)
}

func TestFailRequestDuringRestartWaits(t *testing.T) {
	// A restarted child takes a second to initialise: a request that
	// arrives meanwhile must wait for it.
	h := startModule(t, "fail-mod", failOpts(t, failConfig{RestartInitSleep: time.Second}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid
	require.NoError(t, syscall.Kill(pid0, syscall.SIGKILL))
	waitFor(t, 10*time.Second, "the parent to notice the kill", func() bool { return h.Stats().Pid != pid0 })
	st := h.Stats()
	require.Equal(t, "restarting", st.State, "Stats right after the kill was noticed: %+v, want state restarting (the restart takes a second)", st)
	code, body := fetch(t, srv.URL+"/inc")
	assert.Equal(t, http.StatusOK, code, "GET /inc during the restart: %d %q, want 200 from incarnation 1", code, body)
	assert.True(t, strings.HasPrefix(body, "inc=1 "), "GET /inc during the restart: %d %q, want 200 from incarnation 1", code, body)
}

func TestFailRequestRightAfterKillWaits(t *testing.T) {
	// A request sent right after the child was killed, before the parent
	// has necessarily noticed, never reached any module: it must wait for
	// the new child like any request that arrives during the restart, not
	// fail with 502. A few rounds make a race with the parent's noticing
	// show.
	h := startModule(t, "fail-mod", failOpts(t, failConfig{RestartInitSleep: 300 * time.Millisecond}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	for round := 1; round <= 5; round++ {
		require.NoError(t, syscall.Kill(h.Stats().Pid, syscall.SIGKILL))
		code, body := fetch(t, srv.URL+"/inc")
		want := fmt.Sprintf("inc=%d ", round)
		sent := assert.Equal(t, http.StatusOK, code, "round %d: GET /inc sent right after the kill: %q", round, body) &&
			assert.True(t, strings.HasPrefix(body, want), "round %d: GET /inc sent right after the kill: %q, want 200 from incarnation %d", round, body, round)
		if !sent {
			// Let the new child answer, so that the next kill restarts
			// it at once.
			if code, body := fetch(t, srv.URL+"/inc"); code != http.StatusOK || !strings.HasPrefix(body, want) {
				t.Fatalf("round %d: GET /inc after the restart: %d %q", round, code, body)
			}
		}
	}
}

func TestFailRestartWaitBounded(t *testing.T) {
	// A restarted child takes far longer than RestartWait to initialise.
	const restartWait = 100 * time.Millisecond
	h := startModule(t, "fail-mod", failOpts(t, failConfig{RestartInitSleep: time.Minute},
		Options{HealthInterval: time.Hour, RestartWait: restartWait}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid
	require.NoError(t, syscall.Kill(pid0, syscall.SIGKILL))
	waitFor(t, 10*time.Second, "the parent to notice the kill", func() bool { return h.Stats().State == "restarting" })

	start := time.Now()
	res, body, err := fetchErr(srv.URL+"/inc", fetchTimeout)
	took := time.Since(start)
	require.NoError(t, err, "GET /inc")
	require.Equal(t, http.StatusServiceUnavailable, res.StatusCode, "GET /inc while the restart takes a minute: %d %q, want 503", res.StatusCode, body)
	ra := res.Header.Get("Retry-After")
	n, err := strconv.Atoi(ra)
	assert.NoError(t, err, "Retry-After = %q, want a positive number of seconds", ra)
	assert.Greater(t, n, 0, "Retry-After = %q, want a positive number of seconds", ra)
	assert.GreaterOrEqual(t, took, restartWait, "the 503 came after %v, before RestartWait (%v) had passed", took, restartWait)
	assert.LessOrEqual(t, took, 20*time.Second, "the 503 came after %v; RestartWait is %v", took, restartWait)
	t.Logf("503 after %v, Retry-After %s", took, ra)
}

// failStart is one line of the starts file failModule writes.
type failStart struct {
	incarnation, pid int
	at               time.Time
}

func failReadStarts(t *testing.T, dir string) []failStart {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "starts"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var starts []failStart
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var s failStart
		var ns int64
		if _, err := fmt.Sscanf(line, "%d %d %d", &s.incarnation, &s.pid, &ns); err != nil {
			t.Fatalf("bad line %q in starts: %v", line, err)
		}
		s.at = time.Unix(0, ns)
		starts = append(starts, s)
	}
	return starts
}

func TestFailRestartBackoff(t *testing.T) {
	// Every incarnation after the first fails in its ModuleFunc; each
	// records when it started. The gaps between starts must follow the
	// backoff: 100ms, doubling, capped at MaxRestartDelay.
	const maxDelay = 400 * time.Millisecond
	const slack = 3 * time.Second // for a loaded machine, on upper bounds only
	dir := t.TempDir()
	h := startModule(t, "fail-mod", failOpts(t, failConfig{Dir: dir, RestartInitFail: true},
		Options{HealthInterval: time.Hour, MaxRestartDelay: maxDelay}))
	srv := serve(t, h)
	// Incarnation 0 answers a request, so its death restarts at once.
	code, body := fetch(t, srv.URL+"/inc")
	require.Equal(t, http.StatusOK, code, "GET /inc: %d %q", code, body)
	require.NoError(t, syscall.Kill(h.Stats().Pid, syscall.SIGKILL))
	const n = 9 // incarnations 0 to 8
	waitFor(t, 30*time.Second, fmt.Sprintf("%d starts", n), func() bool { return len(failReadStarts(t, dir)) >= n })
	starts := failReadStarts(t, dir)[:n]
	for i, s := range starts {
		require.Equal(t, i, s.incarnation, "start %d was of incarnation %d", i, s.incarnation)
	}
	// The delay before incarnation i+1, after incarnation i failed.
	wantDelay := func(i int) time.Duration {
		d := 100 * time.Millisecond
		for k := 1; k < i && d < maxDelay; k++ {
			d *= 2
		}
		return min(d, maxDelay)
	}
	for i := 1; i+1 < n; i++ {
		gap := starts[i+1].at.Sub(starts[i].at)
		want := wantDelay(i)
		t.Logf("incarnation %d → %d: %v (backoff %v)", i, i+1, gap.Round(time.Millisecond), want)
		assert.GreaterOrEqual(t, gap, want-5*time.Millisecond, "incarnation %d started %v after incarnation %d failed its start; the backoff is %v", i+1, gap, i, want)
		assert.LessOrEqual(t, gap, maxDelay+slack, "incarnation %d started %v after incarnation %d; MaxRestartDelay is %v", i+1, gap, i, maxDelay)
	}
	st := h.Stats()
	assert.GreaterOrEqual(t, st.Restarts, n-2, "Stats = %+v, want state restarting with at least %d restarts", st, n-2)
	assert.Equal(t, "restarting", st.State, "Stats = %+v, want state restarting with at least %d restarts", st, n-2)
	assert.Contains(t, st.LastExit, "refuses to start", "Stats().LastExit = %q, want the module's init error", st.LastExit)
}

func TestFailHangDetected(t *testing.T) {
	const mark = "fail-hang-marker-7f3a"
	logs := newLogSink()
	var events eventLog
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{
		HealthInterval: 50 * time.Millisecond,
		HealthTimeout:  100 * time.Millisecond,
		HealthFailures: 3,
		Logger:         slog.New(slog.NewTextHandler(logs, nil)),
		OnEvent:        events.add,
	}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid

	res, body, err := fetchErr(srv.URL+"/stop?mark="+mark, 30*time.Second)
	require.NoError(t, err, "GET /stop: %v; want 502 once the stopped child is killed", err)
	assert.Equal(t, http.StatusBadGateway, res.StatusCode, "GET /stop: %d %q, want 502", res.StatusCode, body)
	// The 502 says why the child ended: it was killed, it did not exit.
	assert.Contains(t, body, "killed after failing 3 health checks")
	assert.NotContains(t, body, "exited")
	awaitStats(t, h, 20*time.Second, "incarnation 1", runningInc(1))
	assertReaped(t, pid0)
	require.True(t, logs.await("ended:", 10*time.Second), "no record of the child's end:\n%s", logs)
	assert.Equal(t, 1, strings.Count(logs.String(), "Last lines of its output"), "the last lines should be logged once for one hang:\n%s", logs)
	if st := h.Stats(); st.Pid == pid0 || !strings.Contains(st.LastExit, "health") {
		t.Errorf("Stats = %+v, want a new pid (old %d) and a LastExit that names the failed health checks", st, pid0)
	}
	// The record that says the child is unhealthy carries the module's
	// last lines (a text record is one line; the message's newlines are
	// quoted).
	log := logs.String()
	var record string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "unhealthy") {
			record = l
			break
		}
	}
	if record == "" {
		t.Errorf("the parent's log does not say the child was unhealthy:\n%s", log)
	} else if !strings.Contains(record, mark) {
		t.Errorf("the parent's record of the unhealthy child lacks the module's last line %q:\n%s", mark, record)
	}
	// So do the events that say it.
	waitFor(t, 10*time.Second, "ChildExited to reach OnEvent", func() bool { return events.count(ChildExited, "") > 0 })
	for _, kind := range []EventKind{ChildUnhealthy, ChildExited} {
		ev := events.first(kind)
		assert.Contains(t, strings.Join(ev.Output, "\n"), "stderr before SIGSTOP: "+mark, "%v's Output", kind)
	}
	if code, body := fetch(t, srv.URL+"/inc"); code != http.StatusOK || !strings.HasPrefix(body, "inc=1 ") {
		t.Errorf("GET /inc after the restart: %d %q, want 200 from incarnation 1", code, body)
	}
}

func TestFailOldIncarnationMessagesDropped(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid0 := h.Stats().Pid

	drip := failOpen(t, srv.URL+"/drip", "inc0-0\n")
	dripped := failReadAll(drip.Body)
	require.NoError(t, syscall.Kill(pid0, syscall.SIGKILL))
	waitFor(t, 10*time.Second, "the parent to notice the kill", func() bool { return h.Stats().Pid != pid0 })

	// Requests to the next incarnation, sent while it starts.
	const n = 20
	type result struct {
		id   int
		code int
		body string
		err  error
	}
	results := make(chan result, n)
	for i := range n {
		go func() {
			res, body, err := fetchErr(fmt.Sprintf("%s/echo?id=%d", srv.URL, i), 30*time.Second)
			r := result{id: i, body: body, err: err}
			if res != nil {
				r.code = res.StatusCode
			}
			results <- r
		}()
	}
	for range n {
		r := <-results
		want := fmt.Sprintf("inc=1 id=%d", r.id)
		assert.NoError(t, r.err, "request %d", r.id)
		assert.Equal(t, http.StatusOK, r.code, "request %d: %d %q, want 200 %q", r.id, r.code, r.body, want)
		assert.Equal(t, want, r.body, "request %d", r.id)
	}

	b := failAwaitBody(t, dripped, "GET /drip")
	assert.Error(t, b.err, "GET /drip: body ended cleanly after its child was killed; want it aborted")
	// Every line is incarnation 0's; an abort may cut the last one short.
	line := regexp.MustCompile(`^inc0-\d+$`)
	lines := strings.Split(string(b.data), "\n")
	if cut := lines[len(lines)-1]; cut != "" && !strings.HasPrefix("inc0-", cut) && !regexp.MustCompile(`^inc0-\d*$`).MatchString(cut) {
		t.Errorf("GET /drip to incarnation 0 received %q", cut)
	}
	for _, l := range lines[:len(lines)-1] {
		assert.True(t, line.MatchString(l), "GET /drip to incarnation 0 received %q", l)
	}
}

func TestFailShutdownGraceful(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "fail-mod", failOpts(t, failConfig{Dir: dir}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid := h.Stats().Pid

	held := failOpen(t, srv.URL+"/hold?file=release", "part1\n")
	shutdown := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		shutdown <- h.Shutdown(ctx)
	}()
	waitFor(t, 10*time.Second, "Shutdown to begin", func() bool { return h.Stats().State != "running" })

	code, body := fetch(t, srv.URL+"/inc")
	assert.Equal(t, http.StatusServiceUnavailable, code, "GET /inc during Shutdown: %d %q, want 503", code, body)
	select {
	case err := <-shutdown:
		t.Fatalf("Shutdown returned (%v) while a request was in flight", err)
	default:
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	rest := failAwaitBody(t, failReadAll(held.Body), "GET /hold")
	assert.NoError(t, rest.err, "GET /hold during Shutdown: rest of body %q", rest.data)
	assert.Equal(t, "part2\n", string(rest.data), "GET /hold during Shutdown: rest of body")
	select {
	case err := <-shutdown:
		assert.NoError(t, err, "Shutdown: %v, want nil", err)
	case <-time.After(30 * time.Second):
		t.Fatal("Shutdown did not return after the last request finished")
	}
	assertReaped(t, pid)
	st := h.Stats()
	assert.Equal(t, "stopped", st.State, "after Shutdown: Stats = %+v, want stopped", st)
	assert.Zero(t, st.Pid, "after Shutdown: Stats = %+v, want stopped", st)
}

func TestFailShutdownForced(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	pid := h.Stats().Pid

	stuck := failOpen(t, srv.URL+"/forever", "started\n")
	rest := failReadAll(stuck.Body)

	const grace = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	start := time.Now()
	err := h.Shutdown(ctx)
	took := time.Since(start)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "Shutdown with a handler that never returns: %v, want an error wrapping context.DeadlineExceeded", err)
	if err != nil && !strings.Contains(err.Error(), "fail-mod") {
		t.Errorf("Shutdown's error %q does not name the module", err)
	}
	assert.GreaterOrEqual(t, took, grace, "Shutdown returned after %v, before its context ended (%v)", took, grace)
	assert.LessOrEqual(t, took, 20*time.Second, "Shutdown returned %v after its context ended", took-grace)
	assertReaped(t, pid)
	b := failAwaitBody(t, rest, "GET /forever")
	assert.Error(t, b.err, "GET /forever: body ended cleanly (%q) although the child was killed", b.data)
}

func TestFailCloseConcurrent(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	pid := h.Stats().Pid

	var g errgroup.Group
	g.Go(h.Close)
	g.Go(func() error { return h.Shutdown(context.Background()) })
	g.Go(h.Close)
	assert.NoError(t, g.Wait(), "concurrent Close/Shutdown")
	assert.NoError(t, h.Close(), "second Close")
	assert.NoError(t, h.Shutdown(context.Background()), "Shutdown after Close")
	assertReaped(t, pid)
	st := h.Stats()
	assert.Equal(t, "stopped", st.State, "after Close: Stats = %+v, want stopped", st)
	assert.Zero(t, st.Pid, "after Close: Stats = %+v, want stopped", st)
}

func TestFailHealthCheck(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := h.HealthCheck(ctx)
	assert.NoError(t, err, "HealthCheck on a live handle")
	assert.Greater(t, d, time.Duration(0), "HealthCheck on a live handle: want a positive round trip")
	require.NoError(t, h.Close(), "Close")
	_, err = h.HealthCheck(ctx)
	assert.ErrorIs(t, err, ErrClosed, "HealthCheck after Close: %v, want ErrClosed", err)
	if err != nil && !strings.Contains(err.Error(), "fail-mod") {
		t.Errorf("HealthCheck's error %q does not name the module", err)
	}
}

// failHelperParentEnv makes TestHelperParent act as a parent process for
// TestFailOrphan.
const failHelperParentEnv = "SUBPROC_FAIL_HELPER_PARENT"

// TestHelperParent is not a test: TestFailOrphan runs it in a second copy of
// the test binary, to have a parent it can kill. It starts fail-mod, prints
// the child's pid and waits for its stdin to end.
func TestHelperParent(t *testing.T) {
	if os.Getenv(failHelperParentEnv) != "1" {
		t.Skip("a helper process for TestFailOrphan")
	}
	h, err := Start(context.Background(), "fail-mod", Options{HealthInterval: time.Hour})
	require.NoError(t, err)
	fmt.Printf("child-pid %d\n", h.Stats().Pid)
	io.Copy(io.Discard, os.Stdin) // until TestFailOrphan kills this process, or goes away
	h.Close()
}

func TestFailOrphan(t *testing.T) {
	for _, stopped := range []bool{false, true} {
		name := "running child"
		if stopped {
			name = "stopped child"
		}
		t.Run(name, func(t *testing.T) {
			p := startHelperParent(t, "TestHelperParent", failHelperParentEnv)
			line := p.await("its child's pid", func(l string) bool { return strings.HasPrefix(l, "child-pid ") })
			pid, err := strconv.Atoi(strings.TrimPrefix(line, "child-pid "))
			require.NoError(t, err, "the helper parent printed %q", line)
			t.Cleanup(func() {
				if !gone(pid) {
					syscall.Kill(pid, syscall.SIGKILL) // the test failed: leave nothing behind
				}
			})
			if stopped {
				// When the parent dies, the kernel sends SIGHUP and SIGCONT to
				// a process group that becomes orphaned with a stopped member,
				// which would end the child without the parent-death signal:
				// escapeStop keeps the group from being orphaned, so that only
				// the parent-death signal (or the child's watcher, which then
				// kills the group) can end the stopped child.
				escapeStop(t, pid)
			}

			killed := p.kill()
			if err := p.waitErr; err == nil || !strings.Contains(err.Error(), "killed") {
				t.Errorf("the helper parent ended with %v, want killed", err)
			}
			awaitGone(t, pid, 5*time.Second) // the child of the killed parent
			t.Logf("the child exited %v after its parent was killed", time.Since(killed))
		})
	}
}

func TestFailChildOwnProcessGroup(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	pid := h.Stats().Pid
	pgid, err := syscall.Getpgid(pid)
	require.NoError(t, err)
	assert.NotEqual(t, syscall.Getpgrp(), pgid, "the child (pid %d) is in the parent's process group", pid)
	assert.Equal(t, pid, pgid, "the child (pid %d) is in process group %d, want its own", pid, pgid)
}

func TestFailStartErrors(t *testing.T) {
	tests := []struct {
		name          string
		module        string
		startTimeout  time.Duration
		cancelInInit  bool     // cancel Start's context once the ModuleFunc runs
		wantIs        error    // nil: not checked
		wantIn        []string // besides the module's name
		wantChild     bool     // a child was started and must be gone
		wantWithin    time.Duration
		wantAtLeastIn time.Duration
	}{
		{
			name:   "unregistered",
			module: "fail-never-registered",
			wantIs: ErrNotRegistered,
			wantIn: []string{"not registered", "Register"},
		},
		{
			name:      "init error",
			module:    "fail-init-error",
			wantIn:    []string{failInitErrorText},
			wantChild: true,
		},
		{
			name:      "init panic",
			module:    "fail-init-panic",
			wantIn:    []string{"panic", failInitPanicText},
			wantChild: true,
		},
		{
			name:      "init exits",
			module:    "fail-init-exit",
			wantIn:    []string{"exit status 5", failInitExitText},
			wantChild: true,
		},
		{
			name:          "init hangs",
			module:        "fail-init-hang",
			startTimeout:  300 * time.Millisecond,
			wantIs:        ErrStartTimeout,
			wantIn:        []string{"StartTimeout"},
			wantChild:     true,
			wantWithin:    20 * time.Second,
			wantAtLeastIn: 300 * time.Millisecond,
		},
		{
			name:         "context canceled during init",
			module:       "fail-init-hang",
			cancelInInit: true,
			wantIs:       context.Canceled,
			wantChild:    true,
			wantWithin:   20 * time.Second, // StartTimeout is the default 30s
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			pidFile := filepath.Join(dir, "pid")
			if tt.cancelInInit {
				stop := make(chan struct{})
				watched := make(chan struct{})
				defer func() { close(stop); <-watched }()
				go func() {
					defer close(watched)
					for !fileExists(pidFile)() {
						select {
						case <-stop:
							return
						case <-time.After(5 * time.Millisecond):
						}
					}
					cancel()
				}()
			}
			before := goleak.IgnoreCurrent()
			start := time.Now()
			h, err := Start(ctx, tt.module, testOptions(t, failOpts(t, failConfig{Dir: dir}, Options{StartTimeout: tt.startTimeout})))
			took := time.Since(start)
			if err == nil {
				h.Close()
				t.Fatalf("Start(%q) succeeded, want an error", tt.module)
			}
			assert.Nil(t, h, "Start(%q) returned a Handle with its error", tt.module)
			t.Logf("Start(%q) after %v: %v", tt.module, took.Round(time.Millisecond), err)
			var se *StartError
			if !errors.As(err, &se) || se.Module != tt.module {
				t.Errorf("Start's error is %T %+v, want a *StartError for %q", err, err, tt.module)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("Start's error does not match %v: %v", tt.wantIs, err)
			}
			for _, s := range append([]string{`"` + tt.module + `"`}, tt.wantIn...) {
				assert.Contains(t, err.Error(), s, "Start's error does not say %q:\n%v", s, err)
			}
			if tt.wantWithin > 0 {
				assert.LessOrEqual(t, took, tt.wantWithin, "Start returned after %v, want within %v", took, tt.wantWithin)
			}
			assert.GreaterOrEqual(t, took, tt.wantAtLeastIn, "Start returned after %v, before StartTimeout %v", took, tt.wantAtLeastIn)
			if tt.wantChild {
				// os.WriteFile truncates, then writes: wait for the pid.
				var b []byte
				waitFor(t, 10*time.Second, "the module's pid", func() bool {
					b, _ = os.ReadFile(pidFile)
					return len(b) > 0
				})
				pid, err := strconv.Atoi(string(b))
				require.NoError(t, err)
				assertReaped(t, pid)
			}
			goleak.VerifyNone(t, before)
		})
	}
}

func TestFailStartInitWritesStdout(t *testing.T) {
	out := newLogSink()
	h := startModule(t, "fail-init-stdout", failOpts(t, failConfig{}, Options{Stderr: out, HealthInterval: time.Hour}))
	srv := serve(t, h)
	code, body := fetch(t, srv.URL+"/")
	assert.Equal(t, http.StatusOK, code, "GET / of a module that printed to stdout in init: %d %q, want 200 ok", code, body)
	assert.Equal(t, "ok", body, "GET / of a module that printed to stdout in init: %d %q, want 200 ok", code, body)
	for _, how := range []string{"fmt.Println", "os.Stdout", "fd 1"} {
		line := "[fail-init-stdout] " + failInitStdoutText + " (" + how + ")"
		assert.True(t, out.await(line, 10*time.Second), "the module's stdout line %q did not reach its log; got:\n%s", line, out)
	}
}

func TestFailChildModeByHand(t *testing.T) {
	devNull, err := os.Open(os.DevNull)
	require.NoError(t, err)
	defer devNull.Close()
	tests := []struct {
		name  string
		stdin io.Reader
		extra []*os.File
	}{
		{"stdin from /dev/null", nil, nil},
		{"stdin a pipe", strings.NewReader("hello\n"), nil},
		{"garbage on stdin, all descriptors", strings.NewReader("GET / HTTP/1.1\r\n\r\n"), []*os.File{devNull, devNull}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0])
			cmd.Env = append(os.Environ(), envModule+"=fail-mod")
			cmd.Stdin = tt.stdin
			cmd.ExtraFiles = tt.extra
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			cmd.WaitDelay = 5 * time.Second
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Errorf("the binary run by hand in child mode ended with %v, want exit status 2", err)
			}
			msg := stderr.String()
			if !strings.Contains(msg, "not started by subproc.Start") && !strings.Contains(msg, "not by subproc.Start") {
				t.Errorf("stderr does not say the process was not started by subproc.Start:\n%s", msg)
			}
			assert.Contains(t, strings.ToLower(msg), "unset "+strings.ToLower(envModule), "stderr does not say to unset %s:\n%s", envModule, msg)
		})
	}
}

func TestFailModulesIndependent(t *testing.T) {
	dir := t.TempDir()
	a := startModule(t, "fail-twin-a", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	b := startModule(t, "fail-twin-b", failOpts(t, failConfig{Dir: dir}, Options{HealthInterval: time.Hour}))
	sa, sb := serve(t, a), serve(t, b)
	pa, pb := a.Stats().Pid, b.Stats().Pid
	if pa == 0 || pb == 0 || pa == pb {
		t.Fatalf("child pids %d and %d, want two distinct children", pa, pb)
	}

	held := failOpen(t, sb.URL+"/hold?file=release", "part1\n")
	require.NoError(t, syscall.Kill(pa, syscall.SIGKILL))
	awaitStats(t, a, 20*time.Second, "fail-twin-a's incarnation 1", runningInc(1))
	if code, body := fetch(t, sa.URL+"/inc"); code != http.StatusOK || !strings.HasPrefix(body, "inc=1 ") {
		t.Errorf("fail-twin-a after its kill: %d %q, want 200 from incarnation 1", code, body)
	}

	st := b.Stats()
	assert.Equal(t, pb, st.Pid, "fail-twin-b after fail-twin-a's kill: Stats = %+v, want its first child pid %d still running", st, pb)
	assert.Zero(t, st.Incarnation, "fail-twin-b after fail-twin-a's kill: Stats = %+v, want its first child pid %d still running", st, pb)
	assert.Zero(t, st.Restarts, "fail-twin-b after fail-twin-a's kill: Stats = %+v, want its first child pid %d still running", st, pb)
	assert.Equal(t, "running", st.State, "fail-twin-b after fail-twin-a's kill: Stats = %+v, want its first child pid %d still running", st, pb)
	want := fmt.Sprintf("inc=0 pid=%d", pb)
	if code, body := fetch(t, sb.URL+"/inc"); code != http.StatusOK || body != want {
		t.Errorf("fail-twin-b after fail-twin-a's kill: %d %q, want 200 %q", code, body, want)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	if rest := failAwaitBody(t, failReadAll(held.Body), "fail-twin-b GET /hold"); rest.err != nil || string(rest.data) != "part2\n" {
		t.Errorf("fail-twin-b's request in flight across fail-twin-a's kill: rest %q (%v), want %q", rest.data, rest.err, "part2\n")
	}
}

// abortingWriter is a ResponseWriter that panics with http.ErrAbortHandler
// at its first write, as a middleware's may.
type abortingWriter struct{ http.ResponseWriter }

func (w abortingWriter) Write([]byte) (int, error) { panic(http.ErrAbortHandler) }

// A ResponseWriter that panics in the middle of a response ends the request
// in the child too: the handler's context is canceled, as when the client
// goes away, and the parent keeps no stream for it. (The parent used to
// drop what the child sent and tell it nothing: the handler waited for
// window credit, or here for its context, as long as the child lived.)
func TestFailPanickingWriterCancelsHandler(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{HealthInterval: time.Hour}))
	func() {
		defer func() { assert.Equal(t, http.ErrAbortHandler, recover(), "ServeHTTP's panic") }()
		h.ServeHTTP(abortingWriter{httptest.NewRecorder()}, httptest.NewRequest("GET", "/stream", nil))
	}()
	c := firstChild(h)
	assert.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.pending) == 0 && len(c.forgotten) == 0
	}, 10*time.Second, time.Millisecond, "the child's handler still runs for a request whose writer panicked")
}
