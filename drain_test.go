package subproc

// End-to-end tests of the supervisor's containment: what a drain tells the
// module, health checks during a drain, backoff of crash loops, and what
// Stats and the log say of a child that fails its checks.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// drainConfig is what the drain- module reads from Env.Config.
type drainConfig struct {
	Dir string // where /request-ctx records what it saw
}

func init() {
	Register("drain-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		var cfg drainConfig
		if len(env.Config) > 0 {
			if err := json.Unmarshal(env.Config, &cfg); err != nil {
				return nil, err
			}
		}
		mux := http.NewServeMux()
		// /events streams ticks until the module's context ends, then
		// says goodbye and returns, as a well-behaved event stream does.
		mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for {
				io.WriteString(w, "tick\n")
				w.(http.Flusher).Flush()
				select {
				case <-ctx.Done():
					io.WriteString(w, "bye\n")
					return
				case <-r.Context().Done():
					return
				case <-tick.C:
				}
			}
		})
		// /request-ctx ignores the module's context and ends only with
		// its request's, which it records in <Dir>/request-ctx.
		mux.HandleFunc("/request-ctx", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "started\n")
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			os.WriteFile(filepath.Join(cfg.Dir, "request-ctx"), []byte(r.Context().Err().Error()), 0o644)
		})
		// /poison crashes the child 20ms after it arrives.
		mux.HandleFunc("/poison", func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(20 * time.Millisecond)
			os.Exit(3)
		})
		mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, os.Getpid())
		})
		return mux, nil
	})
}

// A drain cancels the ModuleFunc's context at once: a stream that watches
// it ends by itself, and Shutdown returns without waiting for its grace.
func TestDrainCancelsModuleContext(t *testing.T) {
	h := startModule(t, "drain-mod", Options{HealthInterval: time.Hour})
	srv := serve(t, h)
	res := failOpen(t, srv.URL+"/events", "tick\n")
	body := failReadAll(res.Body)

	done := make(chan error, 1)
	go func() { done <- h.Shutdown(context.Background()) }()
	b := failAwaitBody(t, body, "GET /events")
	require.NoError(t, b.err, "the stream should end cleanly")
	assert.True(t, strings.HasSuffix(string(b.data), "bye\n"), "the stream ended without its goodbye: %q", b.data)
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("Shutdown(context.Background()) did not return after the stream ended")
	}
}

// At the end of the grace period, the requests still in flight have their
// contexts canceled in the child before it is killed.
func TestDrainGraceEndCancelsRequests(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "drain-mod", withConfig(t, drainConfig{Dir: dir}, Options{HealthInterval: time.Hour}))
	srv := serve(t, h)
	res := failOpen(t, srv.URL+"/request-ctx", "started\n")
	defer res.Body.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := h.Shutdown(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	got, rerr := os.ReadFile(filepath.Join(dir, "request-ctx"))
	require.NoError(t, rerr, "the handler's request context was not canceled before the child ended")
	assert.Equal(t, context.Canceled.Error(), string(got))
}

// A child that hangs while it drains is found by the health checks and
// killed, so that Shutdown(context.Background()) returns.
func TestDrainHungChildIsKilled(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{
		HealthInterval: 50 * time.Millisecond,
		HealthTimeout:  100 * time.Millisecond,
		HealthFailures: 3,
	}))
	srv := serve(t, h)
	pid := h.Stats().Pid
	res := failOpen(t, srv.URL+"/forever", "started\n")
	defer res.Body.Close()

	done := make(chan error, 1)
	go func() { done <- h.Shutdown(context.Background()) }()
	waitFor(t, 10*time.Second, "the drain to begin", func() bool { return h.Stats().State == "stopping" })
	require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		syscall.Kill(pid, syscall.SIGKILL)
		t.Fatal("Shutdown(context.Background()) did not return 30s after the draining child froze")
	}
	assertReaped(t, pid)
}

// A request that crashes the child soon after it arrives, retried by its
// clients, restarts the module with backoff, although each child answered
// requests before it died.
func TestDrainCrashLoopBacksOff(t *testing.T) {
	logs := newLogSink()
	h := startModule(t, "drain-mod", Options{
		HealthInterval: time.Hour,
		Logger:         slog.New(slog.NewTextHandler(logs, nil)),
	})
	srv := serve(t, h)
	dur := chaosN(3*time.Second, 20*time.Second)
	client := &http.Client{Timeout: 30 * time.Second}
	for end := time.Now().Add(dur); time.Now().Before(end); {
		// Each child answers one request, then takes the poison.
		if res, err := client.Get(srv.URL + "/pid"); err == nil {
			res.Body.Close()
		}
		if res, err := client.Get(srv.URL + "/poison"); err == nil {
			res.Body.Close()
		}
	}
	restarts := h.Stats().Restarts
	t.Logf("%d restarts in %v of a crash loop", restarts, dur)
	// Without backoff: one every few tens of ms. With it: 0, 0.1, 0.2,
	// 0.4, 0.8 and 1.6s of delay fill three seconds.
	assert.LessOrEqual(t, restarts, 10, "the crash loop restarted the module too often")
	assert.GreaterOrEqual(t, restarts, 3)
	assert.Contains(t, logs.String(), "backing off")
}

// A single crash of a module that has served for a while restarts it at
// once, without backoff.
func TestDrainSingleCrashRestartsAtOnce(t *testing.T) {
	logs := newLogSink()
	h := startModule(t, "drain-mod", Options{
		HealthInterval:  time.Hour,
		MaxRestartDelay: time.Minute, // a backoff would show
		Logger:          slog.New(slog.NewTextHandler(logs, nil)),
	})
	for round := range 2 {
		pid := h.Stats().Pid
		time.Sleep(stableUptime + 100*time.Millisecond) // the child's uptime, which is what makes it healthy
		require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
		waitFor(t, 20*time.Second, fmt.Sprintf("restart %d", round+1), func() bool {
			st := h.Stats()
			return st.State == "running" && st.Pid != pid
		})
	}
	assert.NotContains(t, logs.String(), "backing off")
}

// A failed health check shows in Stats at once, with the count of failed
// checks; a passed one clears it. Handle.HealthCheck counts as a check.
func TestDrainUnhealthyShowsAtOnce(t *testing.T) {
	h := startModule(t, "drain-mod", Options{
		HealthInterval: time.Hour,
		HealthTimeout:  100 * time.Millisecond,
		HealthFailures: 2,
	})
	pid := h.Stats().Pid
	freeze := func() {
		require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
		waitFor(t, 10*time.Second, "the child to stop", func() bool { return procState(pid) == "T" })
	}
	freeze()
	defer syscall.Kill(pid, syscall.SIGCONT)

	_, err := h.HealthCheck(context.Background())
	require.Error(t, err)
	st := h.Stats()
	assert.Equal(t, "unhealthy", st.State)
	require.Len(t, st.Children, 1)
	assert.Equal(t, 1, st.Children[0].FailedChecks)
	assert.Equal(t, "unhealthy", st.Children[0].State)

	require.NoError(t, syscall.Kill(pid, syscall.SIGCONT))
	_, err = h.HealthCheck(context.Background())
	require.NoError(t, err)
	st = h.Stats()
	assert.Equal(t, "running", st.State)
	assert.Equal(t, 0, st.Children[0].FailedChecks)

	// Two failed checks in a row kill the child, as the supervisor's do.
	freeze()
	h.HealthCheck(context.Background())
	h.HealthCheck(context.Background())
	waitFor(t, 20*time.Second, "a new child", func() bool {
		st := h.Stats()
		return st.State == "running" && st.Pid != pid
	})
	assert.Contains(t, h.Stats().LastExit, "health checks")
}
