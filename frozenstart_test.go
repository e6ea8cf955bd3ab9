package subproc

// Children that freeze while they start: before they read their hello (an
// init function that blocks, a SIGSTOP or a cgroup freeze at that moment),
// or in their ModuleFunc. Start, Restart, recycles and Shutdown must still
// end in their time, and the old child serve on.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// frozenConfig is what frozen-mod reads from Env.Config.
type frozenConfig struct {
	FreezeFrom int    // incarnations from this one on stop themselves (SIGSTOP) in their ModuleFunc; 0 for none
	Pad        string // makes the Config, and so the child's hello, large
}

// envFreezeFile names, in a child's environment, a file whose existence
// makes the child stop itself (SIGSTOP) before Main runs, so before it
// reads its hello.
const envFreezeFile = "SUBPROC_TEST_FREEZE_FILE"

func init() {
	if f := os.Getenv(envFreezeFile); f != "" && os.Getenv(envModule) != "" {
		if _, err := os.Stat(f); err == nil {
			syscall.Kill(os.Getpid(), syscall.SIGSTOP)
			for { // the stop may take hold a moment later: go no further
				time.Sleep(time.Hour)
			}
		}
	}
	Register("frozen-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		var cfg frozenConfig
		if err := json.Unmarshal(env.Config, &cfg); err != nil {
			return nil, err
		}
		if cfg.FreezeFrom > 0 && env.Incarnation >= cfg.FreezeFrom {
			syscall.Kill(os.Getpid(), syscall.SIGSTOP)
			<-make(chan struct{}) // the stop may take hold a moment later: never return
		}
		id := fmt.Sprintf("pid=%d inc=%d", os.Getpid(), env.Incarnation)
		mux := http.NewServeMux()
		mux.HandleFunc("/id", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, id) })
		return mux, nil
	})
}

// frozenOptions returns opts for frozen-mod with cfg, and a file that, once
// it exists, makes the children that start next freeze before their hello.
func frozenOptions(t *testing.T, cfg frozenConfig, opts Options) (Options, string) {
	t.Helper()
	freeze := t.TempDir() + "/freeze"
	opts.Env = append(os.Environ(), envFreezeFile+"="+freeze)
	return testOptions(t, withConfig(t, cfg, opts)), freeze
}

// largeHello is a Config larger than a pipe holds (1 MiB at most), so
// that the hello's write waits for the child to read it.
var largeHello = strings.Repeat("x", 2<<20)

// startingChild waits for h to list a child other than old, which has
// stopped itself, and returns its pid.
func startingChild(t *testing.T, h *Handle, old int) int {
	t.Helper()
	var pid int
	awaitStats(t, h, 10*time.Second, "a replacement starting", func(st Stats) bool {
		for _, c := range st.Children {
			if c.Pid != old {
				pid = c.Pid
			}
		}
		return pid != 0
	})
	waitFor(t, 10*time.Second, "the replacement to stop itself", func() bool { return procState(pid) == "T" })
	return pid
}

// returnsWithin reports whether ch receives within d; it hands what it
// received to got.
func returnsWithin[T any](ch <-chan T, d time.Duration, got *T) bool {
	select {
	case *got = <-ch:
		return true
	case <-time.After(d):
		return false
	}
}

// A child that freezes before it reads a hello larger than the pipe holds
// fails Start at its StartTimeout. (The parent's write of the hello held
// Start for good.)
func TestFrozenBeforeHelloFailsStart(t *testing.T) {
	opts, freeze := frozenOptions(t, frozenConfig{Pad: largeHello}, Options{StartTimeout: time.Second})
	require.NoError(t, os.WriteFile(freeze, nil, 0o600))
	started := make(chan error, 1)
	go func() {
		h, err := Start(context.Background(), "frozen-mod", opts)
		if err == nil {
			h.Close()
		}
		started <- err
	}()
	var err error
	if !returnsWithin(started, 10*time.Second, &err) {
		for _, p := range procList() { // let the test end
			if p.ppid == os.Getpid() && p.state == "T" {
				syscall.Kill(p.pid, syscall.SIGKILL)
			}
		}
		<-started
		t.Fatal("Start, with a StartTimeout of 1s, had not returned after 10s")
	}
	require.ErrorIs(t, err, ErrStartTimeout)
}

// A replacement that freezes before it reads a hello larger than the pipe
// holds: Restart fails at StartTimeout while the old child serves; when
// the old child then crashes, the slot restarts; Shutdown ends in its
// time. (The parent's write of the hello held the slot's supervisor for
// good: Restart, the restart after the crash and Shutdown never ended.)
func TestFrozenBeforeHelloFailsRestart(t *testing.T) {
	opts, freeze := frozenOptions(t, frozenConfig{Pad: largeHello}, Options{StartTimeout: time.Second, HealthInterval: 100 * time.Millisecond})
	h := startModule(t, "frozen-mod", opts)
	srv := serve(t, h)
	old := h.Stats().Pid
	require.NoError(t, os.WriteFile(freeze, nil, 0o600))

	restarted := make(chan error, 1)
	go func() { restarted <- h.Restart(context.Background()) }()
	frozen := startingChild(t, h, old)
	defer syscall.Kill(frozen, syscall.SIGKILL) // whatever fails below, the test ends
	var err error
	code, body := fetch(t, srv.URL+"/id")
	assert.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, fmt.Sprintf("pid=%d ", old), "the old child serves while its replacement starts")
	if !returnsWithin(restarted, 10*time.Second, &err) {
		t.Fatal("Restart, with a StartTimeout of 1s, had not returned after 10s")
	}
	require.ErrorIs(t, err, ErrStartTimeout)
	awaitGone(t, frozen, 10*time.Second)

	require.NoError(t, os.Remove(freeze))
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	awaitStats(t, h, 10*time.Second, "a new child after the old one's crash", func(st Stats) bool {
		return st.State == "running" && st.Pid != old && st.Pid != frozen
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- h.Shutdown(ctx) }()
	if !returnsWithin(shut, 10*time.Second, &err) {
		t.Fatal("Shutdown, with a context of 1s, had not returned after 10s")
	}
}

// The same for a recycle (MaxRequests 1): the old child serves on, the
// failed replacement is killed, and Shutdown ends in its time.
func TestFrozenBeforeHelloFailsRecycle(t *testing.T) {
	opts, freeze := frozenOptions(t, frozenConfig{Pad: largeHello}, Options{StartTimeout: time.Second, HealthInterval: 100 * time.Millisecond, MaxRequests: 1})
	h := startModule(t, "frozen-mod", opts)
	srv := serve(t, h)
	old := h.Stats().Pid
	require.NoError(t, os.WriteFile(freeze, nil, 0o600))
	code, body := fetch(t, srv.URL+"/id") // the child's one request: it is due for recycling
	require.Equal(t, http.StatusOK, code, body)
	frozen := startingChild(t, h, old)
	defer syscall.Kill(frozen, syscall.SIGKILL)
	code, body = fetch(t, srv.URL+"/id")
	assert.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, fmt.Sprintf("pid=%d ", old), "the old child serves while its replacement starts")
	awaitGone(t, frozen, 10*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- h.Shutdown(ctx) }()
	var err error
	if !returnsWithin(shut, 10*time.Second, &err) {
		t.Fatal("Shutdown, with a context of 1s, had not returned after 10s")
	}
}

// A replacement that freezes in its ModuleFunc: Restart returns the
// start's error at StartTimeout, the old child serves throughout and
// after, and the events tell the truth.
func TestFrozenInModuleFuncFailsRestart(t *testing.T) {
	var events eventLog
	opts, _ := frozenOptions(t, frozenConfig{FreezeFrom: 1}, Options{StartTimeout: 2 * time.Second, HealthInterval: 100 * time.Millisecond, OnEvent: events.add})
	h := startModule(t, "frozen-mod", opts)
	srv := serve(t, h)
	old := h.Stats().Pid
	restarted := make(chan error, 1)
	go func() { restarted <- h.Restart(context.Background()) }()
	frozen := startingChild(t, h, old)
	defer syscall.Kill(frozen, syscall.SIGKILL)
	code, body := fetch(t, srv.URL+"/id")
	assert.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, fmt.Sprintf("pid=%d ", old))
	assert.True(t, h.Ready(), "ready while the replacement starts")
	var err error
	if !returnsWithin(restarted, 20*time.Second, &err) {
		t.Fatal("Restart hangs on a replacement frozen in its ModuleFunc")
	}
	var se *StartError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, ErrStartTimeout)
	awaitGone(t, frozen, 10*time.Second)
	st := h.Stats()
	require.Len(t, st.Children, 1)
	assert.Equal(t, old, st.Pid)
	assert.Equal(t, "running", st.Children[0].State)
	code, body = fetch(t, srv.URL+"/id")
	assert.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, body, fmt.Sprintf("pid=%d ", old))
	assert.Equal(t, 1, events.count(ChildStarted, ""), "events: %v", events.kinds())
	assert.Equal(t, 1, events.count(ChildRecycling, "restart"), "events: %v", events.kinds())
	assert.Equal(t, 0, events.count(ChildUnhealthy, ""), "events: %v", events.kinds())
}
