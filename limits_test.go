package subproc

// End-to-end tests of the limits: memory, time, stuck handlers, the stacks
// of a hung child, and admission, with real children of the limits- module.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
)

// What /leak holds, in a child of the limits- module.
var (
	limitsHeld [][]byte
	limitsMu   sync.Mutex
)

func init() {
	Register("limits-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		var cfg drainConfig // Dir: where /slow looks for its file
		if len(env.Config) > 0 {
			if err := json.Unmarshal(env.Config, &cfg); err != nil {
				return nil, err
			}
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, os.Getpid())
		})
		// /leak?mb=n&every=d holds n MiB more every d, resident, until the
		// child ends.
		mux.HandleFunc("/leak", func(w http.ResponseWriter, r *http.Request) {
			mb, _ := strconv.Atoi(r.URL.Query().Get("mb"))
			every, _ := time.ParseDuration(r.URL.Query().Get("every"))
			go func() {
				for {
					b := make([]byte, mb<<20)
					for i := 0; i < len(b); i += 4096 {
						b[i] = 1 // resident
					}
					limitsMu.Lock()
					limitsHeld = append(limitsHeld, b)
					limitsMu.Unlock()
					time.Sleep(every)
				}
			}()
		})
		mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, os.Getenv(r.URL.Query().Get("k")))
		})
		// /deadline waits for its context and says how it ended.
		mux.HandleFunc("/deadline", func(w http.ResponseWriter, r *http.Request) {
			d, ok := r.Context().Deadline()
			if r.URL.Query().Get("stream") != "" {
				io.WriteString(w, "started\n")
				w.(http.Flusher).Flush()
			}
			<-r.Context().Done()
			limitsSaw <- fmt.Sprintf("%d %v %v", d.UnixNano(), ok, context.Cause(r.Context()))
		})
		mux.HandleFunc("/saw", func(w http.ResponseWriter, r *http.Request) {
			select {
			case s := <-limitsSaw:
				io.WriteString(w, s)
			case <-time.After(10 * time.Second):
				http.Error(w, "nothing seen", http.StatusInternalServerError)
			}
		})
		// /deaf says it has started, then never returns, whatever its
		// context says.
		mux.HandleFunc("/deaf", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "started\n")
			w.(http.Flusher).Flush()
			limitsStuckHandler()
		})
		// /stuck never returns, whatever its context says.
		mux.HandleFunc("/stuck", func(w http.ResponseWriter, r *http.Request) {
			limitsStuckOnce.Do(func() { fmt.Fprintln(os.Stderr, limitsStuckLine) })
			limitsStuckHandler()
		})
		// /slow waits for <Dir>/release.
		mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
			for {
				if _, err := os.Stat(filepath.Join(cfg.Dir, "release")); err == nil {
					break
				}
				select {
				case <-r.Context().Done():
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
			io.WriteString(w, "slow done")
		})
		mux.HandleFunc("/starve", func(w http.ResponseWriter, r *http.Request) {
			chaosHang("starve")
		})
		return mux, nil
	})
}

var limitsSaw = make(chan string, 1)

func init() {
	// A ModuleFunc that takes 300 MiB, resident, and does not return.
	Register("limits-initleak", func(ctx context.Context, env *Env) (http.Handler, error) {
		for range 300 {
			b := make([]byte, 1<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			limitsMu.Lock()
			limitsHeld = append(limitsHeld, b)
			limitsMu.Unlock()
		}
		<-ctx.Done()
		return nil, ctx.Err()
	})
}

func init() {
	// A ModuleFunc that takes a while (it loads something, say) and
	// little memory.
	Register("limits-slowinit", func(ctx context.Context, env *Env) (http.Handler, error) {
		select {
		case <-time.After(1500 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return http.NotFoundHandler(), nil
	})
}

// MemoryMax while a child starts counts what it allocated, not the pages of
// its binary that its package initialisation touched, which it drops once
// ready: a child whose ModuleFunc outlives HealthInterval starts, and runs,
// under a MemoryMax a little above what it uses running.
func TestLimitsMemoryWhileStartingIgnoresBinaryPages(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("memory limits read /proc")
	}
	h, err := Start(context.Background(), "limits-slowinit", testOptions(t, Options{}))
	require.NoError(t, err)
	c := firstChild(h)
	var running int64
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) { // the highest it reads, once its pages were dropped
		time.Sleep(100 * time.Millisecond)
		running = max(running, c.proc.Memory())
	}
	require.NoError(t, h.Close())
	limit := running + 3<<20
	t.Logf("running: %d KiB; MemoryMax: %d KiB", running>>10, limit>>10)
	h, err = Start(context.Background(), "limits-slowinit", testOptions(t, Options{MemoryMax: limit, HealthInterval: 100 * time.Millisecond, StartTimeout: time.Minute}))
	require.NoError(t, err, "a child that runs %d KiB under MemoryMax", (limit-running)>>10)
	defer h.Close()
	awaitStats(t, h, 10*time.Second, "a check of the running child", func(st Stats) bool {
		return len(st.Children) == 1 && st.Children[0].Memory > 0
	})
	assert.Less(t, h.Stats().Children[0].Memory, limit)
}

// MemoryMax holds while a child starts: one whose ModuleFunc takes more is
// killed at the next check, and Start fails saying so, instead of letting
// it grow until StartTimeout.
func TestLimitsMemoryWhileStarting(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("memory limits read /proc")
	}
	opts := testOptions(t, Options{MemoryMax: 100 << 20, HealthInterval: 100 * time.Millisecond, StartTimeout: 10 * time.Minute})
	done := make(chan error, 1)
	go func() {
		h, err := Start(context.Background(), "limits-initleak", opts)
		if h != nil {
			h.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		var se *StartError
		require.ErrorAs(t, err, &se)
		assert.Contains(t, err.Error(), "MemoryMax")
		assert.Equal(t, "memory", startFailure(err))
	case <-time.After(time.Minute):
		t.Fatal("a child past MemoryMax while it started was not killed within a minute")
	}
}

// limitsStuckLine is what the first /stuck writes to stderr, in the child.
const limitsStuckLine = "limits-mod: a request is in /stuck"

var limitsStuckOnce sync.Once

// limitsStuckHandler is where a stuck handler's stack shows it stuck.
//
//go:noinline
func limitsStuckHandler() { select {} }

// A child past MemoryHigh is replaced gracefully, again and again, with no
// failed request; one past MemoryMax is killed.
func TestLimitsMemory(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("memory limits read /proc")
	}
	t.Run("high", func(t *testing.T) {
		var events eventLog
		const high = 96 << 20
		h := startModule(t, "limits-mod", Options{MemoryHigh: high, HealthInterval: 50 * time.Millisecond, OnEvent: events.add})
		srv := serve(t, h)
		_, limit := fetch(t, srv.URL+"/env?k=GOMEMLIMIT")
		assert.Equal(t, strconv.Itoa(high/10*9), limit, "the child's GOMEMLIMIT")
		var peak int64
		failures := 0
		for round := range 3 {
			pid := containPid(t, srv.URL)
			fetch(t, srv.URL+"/leak?mb=16&every=20ms") // 800 MiB/s
			for {
				code, body := fetch(t, srv.URL+"/pid")
				if code != http.StatusOK {
					failures++
				}
				for _, c := range h.Stats().Children {
					peak = max(peak, c.Memory)
				}
				if body != pid && code == http.StatusOK {
					break // replaced
				}
				require.Less(t, events.count(ChildRecycling, "memory"), 10, "round %d", round)
			}
		}
		t.Logf("peak resident memory seen %s with MemoryHigh %s", inMiB(peak), inMiB(high))
		assert.Zero(t, failures, "requests failed while children were replaced")
		waitFor(t, 10*time.Second, "3 recycling events", func() bool { return events.count(ChildRecycling, "memory") >= 3 })
		assert.Zero(t, h.Stats().Restarts, "a recycle is not a crash")
	})
	t.Run("max", func(t *testing.T) {
		var events eventLog
		h := startModule(t, "limits-mod", Options{MemoryMax: 96 << 20, HealthInterval: 50 * time.Millisecond, OnEvent: events.add})
		srv := serve(t, h)
		pid := containPid(t, srv.URL)
		fetch(t, srv.URL+"/leak?mb=16&every=20ms")
		waitFor(t, 20*time.Second, "the child killed and replaced", func() bool {
			st := h.Stats()
			return st.State == "running" && st.Pid != 0 && strconv.Itoa(st.Pid) != pid
		})
		assert.Contains(t, h.Stats().LastExit, "MemoryMax")
		waitFor(t, 10*time.Second, "the exit event", func() bool { return events.count(ChildExited, "memory") == 1 })
	})
}

// RequestTimeout, and a deadline of the parent's request, reach the
// handler's context in the child; at the deadline the client gets 504, or
// an aborted response once it has started.
func TestLimitsTime(t *testing.T) {
	h := startModule(t, "limits-mod", Options{RequestTimeout: 300 * time.Millisecond})
	srv := serve(t, h)

	start := time.Now()
	code, body := fetch(t, srv.URL+"/deadline")
	assert.Equal(t, http.StatusGatewayTimeout, code, body)
	assert.Less(t, time.Since(start), 10*time.Second)
	_, saw := fetch(t, srv.URL+"/saw")
	var ns int64
	var ok bool
	var cause string
	_, err := fmt.Sscanf(saw, "%d %v", &ns, &ok)
	require.NoError(t, err, saw)
	cause = saw[strings.Index(saw, " ")+1:]
	assert.True(t, ok, "the handler's context has no deadline")
	assert.InDelta(t, start.Add(300*time.Millisecond).UnixNano(), ns, float64(200*time.Millisecond))
	assert.Contains(t, cause, "deadline", "the handler's context's cause")

	res, err := http.Get(srv.URL + "/deadline?stream=1")
	require.NoError(t, err)
	_, err = io.ReadAll(res.Body)
	res.Body.Close()
	assert.Error(t, err, "a started response cut by the deadline must be aborted")
	fetch(t, srv.URL+"/saw")

	// A deadline of the parent's own, sooner than RequestTimeout.
	mw := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 100*time.Millisecond)
		defer cancel()
		d, _ := ctx.Deadline()
		w.Header().Set("X-Deadline", strconv.FormatInt(d.UnixNano(), 10))
		h.ServeHTTP(w, r.WithContext(ctx))
	})
	srv2 := serve(t, mw)
	res, err = http.Get(srv2.URL + "/deadline")
	require.NoError(t, err)
	res.Body.Close()
	assert.Equal(t, http.StatusGatewayTimeout, res.StatusCode)
	_, saw = fetch(t, srv.URL+"/saw")
	_, err = fmt.Sscanf(saw, "%d", &ns)
	require.NoError(t, err)
	want, _ := strconv.ParseInt(res.Header.Get("X-Deadline"), 10, 64)
	assert.Equal(t, want, ns, "the child's deadline is the parent's")
	assert.EqualValues(t, 3, h.Stats().Timeouts)
}

// A handler still running StuckTimeout after its request was given up
// makes its child stuck: its stacks go to the module's log, ChildStuck is
// posted, and the child is replaced; the parent holds nothing for the
// abandoned requests.
func TestLimitsStuck(t *testing.T) {
	dir := t.TempDir()
	var events eventLog
	h := startModule(t, "limits-mod", Options{
		LogDir: dir,
		// Long enough for all the requests to be given up first.
		StuckTimeout:   chaosN(300*time.Millisecond, 5*time.Second),
		HealthInterval: 50 * time.Millisecond,
		OnEvent:        events.add,
	})
	srv := serve(t, h)
	pid := containPid(t, srv.URL)
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	n := chaosN(50, 5000)
	client := chaosClient(200)
	defer client.CloseIdleConnections()
	var g errgroup.Group
	g.SetLimit(200) // clients at a time
	for range n {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/stuck", nil)
			if res, err := client.Do(req); err == nil {
				res.Body.Close()
			}
			return nil // the clients give up: that is the test
		})
	}
	g.Wait()
	gaveUp := time.Now() // when the last was given up, about
	waitFor(t, 30*time.Second, "ChildStuck", func() bool { return events.count(ChildStuck, "stuck") == 1 })
	noticed := time.Since(gaveUp)
	waitFor(t, 30*time.Second, "the stuck child replaced", func() bool {
		st := h.Stats()
		return len(st.Children) == 1 && strconv.Itoa(st.Children[0].Pid) != pid && st.Children[0].State == "running"
	})
	client.CloseIdleConnections()
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	t.Logf("%d stuck handlers: noticed %v after the last was given up; parent heap %s before, %s once the child was replaced", n, noticed.Round(time.Millisecond), inMiB(int64(ms0.HeapAlloc)), inMiB(int64(ms1.HeapAlloc)))
	assert.Equal(t, 1, events.count(ChildRecycling, "stuck"))
	var order []string
	for _, ev := range events.all() {
		if ev.Kind == ChildStuck || ev.Kind == ChildRecycling {
			order = append(order, ev.Kind.String())
		}
	}
	assert.Equal(t, []string{"ChildStuck", "ChildRecycling"}, order, "the recycle follows the ChildStuck that caused it")
	assert.Contains(t, events.first(ChildStuck).Output, "err: "+limitsStuckLine, "ChildStuck's Output: what the module wrote before it was found stuck")
	log, err := os.ReadFile(filepath.Join(dir, "limits-mod.log"))
	require.NoError(t, err)
	assert.Contains(t, string(log), "limitsStuckHandler", "the stuck handlers' stacks should be in the module's log")
	assert.Contains(t, string(log), "goroutine ")
	h.mu.Lock()
	for _, c := range h.kids {
		c.mu.Lock()
		assert.Empty(t, c.pending, "the parent holds streams of given-up requests")
		c.mu.Unlock()
	}
	h.mu.Unlock()
}

// A child killed for failing its health checks is first sent SIGQUIT, so
// that its stderr holds its goroutines' stacks.
func TestLimitsHungChildStacks(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "limits-mod", Options{
		LogDir:         dir,
		HealthInterval: 50 * time.Millisecond,
		HealthTimeout:  100 * time.Millisecond,
		HealthFailures: 2,
	})
	srv := serve(t, h)
	pid := containPid(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/starve", nil)
	if res, err := http.DefaultClient.Do(req); err == nil {
		res.Body.Close()
	}
	waitFor(t, 30*time.Second, "the hung child replaced", func() bool {
		st := h.Stats()
		return st.State == "running" && st.Pid != 0 && strconv.Itoa(st.Pid) != pid
	})
	stderr, err := os.ReadFile(filepath.Join(dir, "limits-mod.err"))
	require.NoError(t, err)
	assert.Contains(t, string(stderr), "SIGQUIT", "the hung child's stderr should hold the runtime's dump")
	assert.Contains(t, string(stderr), "goroutine ")
}

// With MaxInFlight and MaxQueued, exactly that many requests are admitted
// or wait; the rest get 503 with Retry-After at once.
func TestLimitsAdmission(t *testing.T) {
	inFlight, queued, n := chaosN(5, 50), chaosN(5, 100), chaosN(30, 1000)
	dir := t.TempDir()
	h := startModule(t, "limits-mod", withConfig(t, drainConfig{Dir: dir}, Options{MaxInFlight: inFlight, MaxQueued: queued, RestartWait: time.Minute}))
	var slowestShed atomic.Int64 // in ServeHTTP, as the server sees it
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		if rec.status == http.StatusServiceUnavailable {
			d := int64(time.Since(start))
			for old := slowestShed.Load(); d > old && !slowestShed.CompareAndSwap(old, d); old = slowestShed.Load() {
			}
		}
	}))
	client := chaosClient(n)
	defer client.CloseIdleConnections()
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	var ok, shed atomic.Int64
	var slowest atomic.Int64
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			start := time.Now()
			res, err := client.Get(srv.URL + "/slow")
			if !assert.NoError(t, err) {
				return
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			switch res.StatusCode {
			case http.StatusOK:
				ok.Add(1)
			case http.StatusServiceUnavailable:
				shed.Add(1)
				assert.NotEmpty(t, res.Header.Get("Retry-After"))
				slowest.Store(max(slowest.Load(), int64(time.Since(start))))
			default:
				t.Errorf("GET /slow: %d %q", res.StatusCode, b)
			}
		})
	}
	waitFor(t, 20*time.Second, "the shed requests", func() bool { return shed.Load() == int64(n-inFlight-queued) })
	runtime.ReadMemStats(&ms1)
	t.Logf("parent heap with %d requests admitted or queued and %d shed: %s (before: %s)", inFlight+queued, n-inFlight-queued, inMiB(int64(ms1.HeapAlloc)), inMiB(int64(ms0.HeapAlloc)))
	st := h.Stats()
	assert.Equal(t, inFlight+queued, st.InFlight+int(h.queued.Load()))
	assert.EqualValues(t, queued, h.queued.Load())
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	wg.Wait()
	t.Logf("%d admitted or queued, %d shed; the slowest 503 took %v in ServeHTTP, %v at the client", ok.Load(), shed.Load(), time.Duration(slowestShed.Load()), time.Duration(slowest.Load()))
	assert.EqualValues(t, inFlight+queued, ok.Load())
	assert.EqualValues(t, n-inFlight-queued, shed.Load())
}

// A request waiting for a MaxInFlight place when Shutdown begins gets 503
// at once, as one waiting for a child does, not after RestartWait; the one
// in flight is served.
func TestLimitsAdmissionQueueAtShutdown(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "limits-mod", withConfig(t, drainConfig{Dir: dir}, Options{MaxInFlight: 1, MaxQueued: 1, RestartWait: 10 * time.Minute}))
	srv := serve(t, h)
	codes := make(chan int, 2)
	get := func() {
		res, _, err := fetchErr(srv.URL+"/slow", 5*time.Minute)
		if !assert.NoError(t, err) {
			codes <- 0
			return
		}
		codes <- res.StatusCode
	}
	go get()
	awaitStats(t, h, 10*time.Second, "the first request in flight", func(st Stats) bool { return st.InFlight == 1 })
	go get()
	waitFor(t, 10*time.Second, "the second request to queue", func() bool { return h.queued.Load() == 1 })
	shut := make(chan error, 1)
	go func() { shut <- h.Shutdown(context.Background()) }()
	select {
	case code := <-codes:
		assert.Equal(t, http.StatusServiceUnavailable, code, "the queued request")
	case <-time.After(time.Minute):
		t.Fatal("the request queued for admission got no answer within a minute of Shutdown")
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	assert.Equal(t, http.StatusOK, <-codes, "the request in flight")
	require.NoError(t, <-shut)
}

// A client that leaves while its request waits for admission gets
// nothing, and nothing was unavailable to it: no 503 is counted, as none
// is for a client that leaves once a child has its request (see
// exchange.canceled).
func TestLimitsAdmissionQueuedClientLeaves(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "limits-mod", withConfig(t, drainConfig{Dir: dir}, Options{MaxInFlight: 1, MaxQueued: 1, HealthInterval: time.Hour}))
	left := make(chan struct{})
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/pid" {
			defer close(left)
		}
		h.ServeHTTP(w, r)
	}))
	slow := make(chan int, 1)
	go func() {
		res, _, err := fetchErr(srv.URL+"/slow", time.Minute)
		if err != nil {
			slow <- 0
			return
		}
		slow <- res.StatusCode
	}()
	awaitStats(t, h, 10*time.Second, "the first request in flight", func(st Stats) bool { return st.InFlight == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	queued := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/pid", nil)
		res, err := srv.Client().Do(req)
		if err == nil {
			res.Body.Close()
		}
		queued <- err
	}()
	waitFor(t, 10*time.Second, "the second request to queue", func() bool { return h.queued.Load() == 1 })
	cancel()
	require.Error(t, <-queued, "the client left: it got no answer")
	select {
	case <-left:
	case <-time.After(10 * time.Second):
		t.Fatal("ServeHTTP of the request whose client left has not returned")
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	assert.Equal(t, http.StatusOK, <-slow, "the request in flight")
	assert.Zero(t, h.Stats().Unavailable, "a 503 counted that no client got")
}

// A child that Handle.HealthCheck finds hung, on the check that makes
// HealthFailures in a row, is killed as one the periodic checks find:
// first asked for its goroutine stacks (SIGQUIT), so that its log shows
// where it hung. (HealthCheck killed it at once, with SIGKILL.)
func TestLimitsHealthCheckKillAsksForStacks(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "limits-mod", Options{
		LogDir: dir, HealthInterval: time.Hour, HealthTimeout: 100 * time.Millisecond, HealthFailures: 1,
	})
	srv := serve(t, h)
	pid := containPid(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/starve", nil)
	if res, err := http.DefaultClient.Do(req); err == nil {
		res.Body.Close()
	}
	// The hang takes hold once the handler's goroutines block.
	waitFor(t, 10*time.Second, "a failed HealthCheck", func() bool {
		_, err := h.HealthCheck(context.Background())
		return err != nil
	})
	awaitStats(t, h, 30*time.Second, "the hung child replaced", func(st Stats) bool {
		return st.State == "running" && st.Pid != 0 && strconv.Itoa(st.Pid) != pid
	})
	stderr, err := os.ReadFile(filepath.Join(dir, "limits-mod.err"))
	require.NoError(t, err)
	assert.Contains(t, string(stderr), "SIGQUIT", "the hung child's stderr should hold the runtime's dump")
}

// A module leaking 50 MB/s with MemoryHigh 200 MB is replaced before it
// passes 300 MB, again and again for a minute, with no failed request on
// its other routes. Only with -chaos: TestLimitsMemory is its short form.
func TestChaosLeak(t *testing.T) {
	if !*chaosFull {
		t.Skip("a minute of leaking: run with -chaos (TestLimitsMemory is the short form)")
	}
	const high = 200e6
	var events eventLog
	h := startModule(t, "limits-mod", Options{MemoryHigh: high, OnEvent: events.add})
	srv := serve(t, h)
	client := chaosClient(4)
	defer client.CloseIdleConnections()
	var peak uint64
	var requests, failed int
	leaking := map[string]bool{}
	for end := time.Now().Add(time.Minute); time.Now().Before(end); {
		res, err := client.Get(srv.URL + "/pid")
		requests++
		if err != nil {
			failed++
			continue
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			failed++
			continue
		}
		pid := string(b)
		if !leaking[pid] {
			leaking[pid] = true
			fetch(t, srv.URL+"/leak?mb=5&every=100ms") // 50 MB/s, in the child that served /pid
		}
		for _, c := range h.Stats().Children {
			peak = max(peak, chaosRSS(c.Pid))
		}
		time.Sleep(10 * time.Millisecond) // the client's pace
	}
	recycled := events.count(ChildRecycling, "memory")
	t.Logf("a minute of leaking 50 MB/s under MemoryHigh %s: %d children recycled, peak RSS %s, %d requests, %d failed", inMiB(high), recycled, inMiB(int64(peak)), requests, failed)
	assert.Zero(t, failed)
	assert.GreaterOrEqual(t, recycled, 10)
	assert.Less(t, peak, uint64(300e6))
}

// statusRecorder records the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

// MaxInFlight bounds the handlers that run in the child, not only the
// requests whose clients wait: a handler that does not watch its context
// keeps its request's place after its client has left, until it ends or
// its child does. (The place came back as the client left: a client that
// sent requests and left at once made the child run any number of them.)
func TestLimitsAdmissionCountsAbandonedHandlers(t *testing.T) {
	h := startModule(t, "limits-mod", Options{MaxInFlight: 2, RestartWait: 100 * time.Millisecond, HealthInterval: time.Hour, StuckTimeout: time.Hour})
	srv := serve(t, h)
	for range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/deaf", nil)
		require.NoError(t, err)
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		line, err := bufio.NewReader(res.Body).ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, "started\n", line)
		cancel() // the client leaves; the handler runs on
		res.Body.Close()
	}
	awaitStats(t, h, 10*time.Second, "the abandoned requests to end in the parent", func(st Stats) bool { return st.InFlight == 0 })
	status, _ := fetch(t, srv.URL+"/pid")
	assert.Equal(t, http.StatusServiceUnavailable, status, "two handlers run in the child: no place is free")

	// The child's end ends them: their places come back.
	inc := h.Stats().Incarnation
	require.NoError(t, syscall.Kill(firstChild(h).proc.Pid(), syscall.SIGKILL))
	awaitStats(t, h, 20*time.Second, "the replacement", runningInc(inc+1))
	status, _ = fetch(t, srv.URL+"/pid")
	assert.Equal(t, http.StatusOK, status)
}

// A request still unanswered when its child's drain ends gets 502, as when
// the child dies before answering: its handler, whose context the drain's
// end cancels, returns without writing, and the client would else see
// its connection closed without a response.
func TestDrainEndUnansweredIs502(t *testing.T) {
	h := startModule(t, "limits-mod", Options{ShutdownTimeout: 200 * time.Millisecond, HealthInterval: time.Hour})
	srv := serve(t, h)
	got := make(chan int, 1)
	go func() {
		res, _, err := fetchErr(srv.URL+"/deadline", 20*time.Second)
		if err != nil {
			got <- 0
			return
		}
		got <- res.StatusCode
	}()
	awaitStats(t, h, 10*time.Second, "the request in flight", func(st Stats) bool { return st.InFlight == 1 })
	require.NoError(t, h.Restart(t.Context()))
	assert.Equal(t, http.StatusBadGateway, <-got)
	assert.Equal(t, uint64(1), h.Stats().BadGateway)
	assert.Zero(t, h.Stats().Aborted)
}
