package subproc

// End-to-end tests of pools, rolling restarts, recycling, events and the
// child process's environment, with real children of the pool- module.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// poolConfig is what the pool- module reads from Env.Config.
type poolConfig struct {
	Dir              string        // /hold waits for <Dir>/<file>
	RestartInitFail  bool          // children after the first incarnations' fail in their ModuleFunc
	RestartInitSleep time.Duration // children after the first ones sleep this long in their ModuleFunc
	First            int           // how many children are "the first ones": the pool's size
}

func init() {
	Register("pool-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		var cfg poolConfig
		if len(env.Config) > 0 {
			if err := json.Unmarshal(env.Config, &cfg); err != nil {
				return nil, err
			}
		}
		if env.Incarnation >= max(cfg.First, 1) {
			time.Sleep(cfg.RestartInitSleep)
			if cfg.RestartInitFail {
				return nil, fmt.Errorf("pool-mod: incarnation %d refuses to start", env.Incarnation)
			}
		}
		id := fmt.Sprintf("pid=%d slot=%d inc=%d", os.Getpid(), env.Slot, env.Incarnation)
		mux := http.NewServeMux()
		mux.HandleFunc("/id", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, id)
		})
		// /echo returns the request body with its SHA-256 in a header.
		mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
			b, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			sum := sha256.Sum256(b)
			w.Header().Set("X-Sum", hex.EncodeToString(sum[:]))
			w.Write(b)
		})
		// /stream?n= writes n bytes of a known pattern, flushed in pieces.
		mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(r.URL.Query().Get("n"))
			for off := 0; off < n; off += 16 << 10 {
				w.Write(poolPattern(off, min(16<<10, n-off)))
				w.(http.Flusher).Flush()
			}
		})
		// /hold?file=x answers its head, waits for <Dir>/x, then ends.
		mux.HandleFunc("/hold", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, id+"\n")
			w.(http.Flusher).Flush()
			name := filepath.Join(cfg.Dir, r.URL.Query().Get("file"))
			for {
				if _, err := os.Stat(name); err == nil {
					io.WriteString(w, "done\n")
					return
				}
				select {
				case <-r.Context().Done():
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		})
		mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
			wd, _ := os.Getwd()
			fmt.Fprintf(w, "%s\n%s", os.Getenv(r.URL.Query().Get("k")), wd)
		})
		return mux, nil
	})
}

// poolPattern returns n bytes of the stream pattern from offset off.
func poolPattern(off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((off + i) * 7 % 251)
	}
	return b
}

// poolID fetches /id and parses it.
func poolID(t *testing.T, url string) (pid, slot, inc int) {
	t.Helper()
	code, body := fetch(t, url+"/id")
	require.Equal(t, http.StatusOK, code, body)
	_, err := fmt.Sscanf(body, "pid=%d slot=%d inc=%d", &pid, &slot, &inc)
	require.NoError(t, err, body)
	return pid, slot, inc
}

// poolPids returns the pids of the handle's running children by slot.
func poolPids(h *Handle) map[int]int {
	pids := map[int]int{}
	for _, c := range h.Stats().Children {
		if c.State == "running" {
			pids[c.Slot] = c.Pid
		}
	}
	return pids
}

// A pool runs Children children, each with its slot and an incarnation of
// its own; requests spread over them by load; a child's death fails only
// its own requests and the others serve on.
func TestPoolCrashFailsOnlyItsRequests(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "pool-mod", withConfig(t, poolConfig{Dir: dir}, Options{Children: 3, HealthInterval: time.Hour}))
	srv := serve(t, h)
	st := h.Stats()
	require.Len(t, st.Children, 3)
	incs := map[int]bool{}
	for i, c := range st.Children {
		assert.Equal(t, i, c.Slot)
		assert.Equal(t, "running", c.State)
		incs[c.Incarnation] = true
	}
	assert.Len(t, incs, 3, "each child has an incarnation of its own")

	// Three long requests: the least loaded child takes each, so one each.
	var holds []*http.Response
	bySlot := map[int]*http.Response{}
	for range 3 {
		res := failOpen(t, srv.URL+"/hold?file=release", "pid=")
		holds = append(holds, res)
	}
	for _, c := range h.Stats().Children {
		assert.Equal(t, 1, c.InFlight, "slot %d", c.Slot)
	}
	// Which child holds which request: read the rest of each first line.
	for _, res := range holds {
		line, err := readLine(res.Body)
		require.NoError(t, err)
		var pid, slot, inc int
		_, err = fmt.Sscanf("pid="+line, "pid=%d slot=%d inc=%d", &pid, &slot, &inc)
		require.NoError(t, err, line)
		bySlot[slot] = res
	}
	require.Len(t, bySlot, 3)

	pids := poolPids(h)
	require.NoError(t, syscall.Kill(pids[0], syscall.SIGKILL))
	// The killed child's request is aborted; the others finish.
	_, err := io.ReadAll(bySlot[0].Body)
	assert.Error(t, err, "the request on the killed child should be aborted")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	for slot := 1; slot < 3; slot++ {
		b, err := io.ReadAll(bySlot[slot].Body)
		assert.NoError(t, err, "slot %d", slot)
		assert.Equal(t, "done\n", string(b), "slot %d", slot)
	}
	waitFor(t, 20*time.Second, "a new child in slot 0", func() bool {
		p := poolPids(h)
		return len(p) == 3 && p[0] != pids[0]
	})
	now := poolPids(h)
	assert.Equal(t, pids[1], now[1])
	assert.Equal(t, pids[2], now[2])
	assertReaped(t, pids[0])
	// The new child has an incarnation none had.
	for _, c := range h.Stats().Children {
		if c.Slot == 0 {
			assert.Equal(t, 3, c.Incarnation)
		}
	}
}

// readLine reads one line from r, byte by byte.
func readLine(r io.Reader) (string, error) {
	var b []byte
	var c [1]byte
	for {
		if _, err := r.Read(c[:]); err != nil {
			return string(b), err
		}
		if c[0] == '\n' {
			return string(b), nil
		}
		b = append(b, c[0])
	}
}

// poolLoad sends GETs, 1 MiB echoes and streams until stop is closed, and
// counts what did not come back whole.
type poolLoad struct {
	sent, failed, wrong atomic.Int64
	mu                  sync.Mutex
	errs                []string
}

func (l *poolLoad) fail(wrong bool, format string, args ...any) {
	if wrong {
		l.wrong.Add(1)
	} else {
		l.failed.Add(1)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 10 {
		l.errs = append(l.errs, fmt.Sprintf(format, args...))
	}
}

func (l *poolLoad) run(clients int, url string, stop <-chan struct{}) (wait func()) {
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	echo := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	sum := sha256.Sum256(echo)
	for i := range clients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				l.sent.Add(1)
				switch k := rng.IntN(10); {
				case k < 7:
					res, err := client.Get(url + "/id")
					if err != nil {
						l.fail(false, "GET /id: %v", err)
						continue
					}
					b, err := io.ReadAll(res.Body)
					res.Body.Close()
					if err != nil || res.StatusCode != 200 {
						l.fail(false, "GET /id: %d %q %v", res.StatusCode, b, err)
					} else if !strings.HasPrefix(string(b), "pid=") {
						l.fail(true, "GET /id: %q", b)
					}
				case k < 9:
					res, err := client.Post(url+"/echo", "application/octet-stream", bytes.NewReader(echo))
					if err != nil {
						l.fail(false, "POST /echo: %v", err)
						continue
					}
					b, err := io.ReadAll(res.Body)
					res.Body.Close()
					got := sha256.Sum256(b)
					switch {
					case err != nil || res.StatusCode != 200:
						l.fail(false, "POST /echo: %d %v", res.StatusCode, err)
					case got != sum || res.Header.Get("X-Sum") != hex.EncodeToString(sum[:]):
						l.fail(true, "POST /echo: wrong body of %d bytes", len(b))
					}
				default:
					const n = 1 << 20
					res, err := client.Get(url + "/stream?n=" + strconv.Itoa(n))
					if err != nil {
						l.fail(false, "GET /stream: %v", err)
						continue
					}
					b, err := io.ReadAll(res.Body)
					res.Body.Close()
					switch {
					case err != nil || res.StatusCode != 200:
						l.fail(false, "GET /stream: %d %v", res.StatusCode, err)
					case !bytes.Equal(b, poolPattern(0, n)):
						l.fail(true, "GET /stream: wrong body of %d bytes", len(b))
					}
				}
			}
		})
	}
	return func() {
		wg.Wait()
		client.CloseIdleConnections()
	}
}

// Ten rolling restarts under load fail no request and return no wrong
// body; each replaces every child.
func TestPoolRestartUnderLoad(t *testing.T) {
	for _, children := range []int{1, 2} {
		t.Run(fmt.Sprintf("children=%d", children), func(t *testing.T) {
			var events eventLog
			h := startModule(t, "pool-mod", Options{Children: children, OnEvent: events.add})
			srv := serve(t, h)
			var load poolLoad
			stop := make(chan struct{})
			wait := load.run(chaosN(8, 64), srv.URL, stop)
			const restarts = 10
			var took []time.Duration
			for range restarts {
				before := poolPids(h)
				start := time.Now()
				require.NoError(t, h.Restart(context.Background()))
				took = append(took, time.Since(start))
				after := poolPids(h)
				require.Len(t, after, children)
				for slot, pid := range before {
					assert.NotEqual(t, pid, after[slot], "slot %d was not replaced", slot)
					assertReaped(t, pid)
				}
			}
			close(stop)
			wait()
			t.Logf("%d requests during %d restarts, %d failed, %d wrong; restart took %v", load.sent.Load(), restarts, load.failed.Load(), load.wrong.Load(), took)
			assert.Zero(t, load.failed.Load(), "failed requests: %q", load.errs)
			assert.Zero(t, load.wrong.Load(), "wrong bodies: %q", load.errs)
			st := h.Stats()
			assert.Zero(t, st.Restarts, "a rolling restart is not a restart after a crash")
			assert.Zero(t, st.BadGateway+st.Unavailable+st.Aborted)
			n := events.count(ChildRecycling, "restart")
			assert.Equal(t, restarts*children, n)
			assert.Equal(t, restarts*children, events.count(ChildExited, "restart"))
			// Each slot's children started restarts+1 times, and every event
			// of a child names its slot.
			events.mu.Lock()
			defer events.mu.Unlock()
			starts := make([]int, children)
			slotOf := map[int]int{}
			for _, ev := range events.events {
				if ev.Kind == ChildStarted {
					require.Less(t, ev.Slot, children, "ChildStarted of pid %d: slot %d", ev.Pid, ev.Slot)
					starts[ev.Slot]++
					slotOf[ev.Pid] = ev.Slot
				}
			}
			for slot, n := range starts {
				assert.Equal(t, restarts+1, n, "children started in slot %d", slot)
			}
			for _, ev := range events.events {
				if slot, ok := slotOf[ev.Pid]; ok {
					assert.Equal(t, slot, ev.Slot, "%v of pid %d, which started in slot %d", ev.Kind, ev.Pid, slot)
				}
			}
		})
	}
}

// A replacement that cannot start leaves the old child serving, and
// Restart returns the *StartError.
func TestPoolRestartFailureKeepsOld(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  poolConfig
		opts Options
		want error
	}{
		{"init fails", poolConfig{RestartInitFail: true, First: 2}, Options{}, nil},
		{"not ready in time", poolConfig{RestartInitSleep: time.Hour, First: 2}, Options{StartTimeout: 300 * time.Millisecond}, ErrStartTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			opts.Children = 2
			h := startModule(t, "pool-mod", withConfig(t, tc.cfg, opts))
			srv := serve(t, h)
			before := poolPids(h)
			err := h.Restart(context.Background())
			var se *StartError
			require.True(t, errors.As(err, &se), "Restart: %v, want a *StartError", err)
			if tc.want != nil {
				assert.ErrorIs(t, err, tc.want)
			} else {
				assert.Contains(t, err.Error(), "refuses to start")
			}
			assert.Equal(t, before, poolPids(h), "the old children should keep serving")
			for range 4 {
				pid, _, _ := poolID(t, srv.URL)
				assert.Contains(t, before, slotOf(before, pid))
			}
		})
	}
}

// slotOf returns the slot whose pid is pid, or -1.
func slotOf(pids map[int]int, pid int) int {
	for slot, p := range pids {
		if p == pid {
			return slot
		}
	}
	return -1
}

// MaxRequests and MaxLifetime replace children gracefully: no request
// fails, and no backoff follows.
func TestPoolRecycling(t *testing.T) {
	for _, tc := range []struct {
		reason string
		opts   Options
	}{
		{"max-requests", Options{MaxRequests: 20}},
		{"lifetime", Options{MaxLifetime: 300 * time.Millisecond}},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			var events eventLog
			opts := tc.opts
			opts.Children = 2
			opts.OnEvent = events.add
			h := startModule(t, "pool-mod", opts)
			srv := serve(t, h)
			pids := map[int]bool{}
			for end := time.Now().Add(3 * time.Second); time.Now().Before(end) || len(pids) < 5; {
				pid, _, _ := poolID(t, srv.URL)
				pids[pid] = true
				require.Less(t, time.Since(end), 30*time.Second, "too few children recycled")
			}
			n := events.count(ChildRecycling, tc.reason)
			t.Logf("%d children served; %d recycled", len(pids), n)
			assert.GreaterOrEqual(t, n, 3)
			assert.Zero(t, events.count(ModuleBackoff, ""), "recycling is not a crash")
			assert.Zero(t, h.Stats().Restarts)
		})
	}
}

// A slot runs at most two children: a child due for recycling serves on
// while the one its slot replaced last still drains, here held by a
// response that waits (as for a client that reads nothing), and is
// recycled once that drain is over. Each child gets a held request, then
// one that it answers, its MaxRequests. (Each recycle started a child of its
// own, each held until ShutdownTimeout: a child per held response.)
func TestPoolRecyclingWaitsForDrain(t *testing.T) {
	dir := t.TempDir()
	var events eventLog
	h := startModule(t, "pool-mod", withConfig(t, poolConfig{Dir: dir}, Options{
		MaxRequests: 1, ShutdownTimeout: time.Minute, HealthInterval: time.Hour, OnEvent: events.add,
	}))
	srv := serve(t, h)
	running := func(inc int) func() bool {
		return func() bool {
			for _, c := range h.Stats().Children {
				if c.Incarnation == inc && c.State == "running" {
					return true
				}
			}
			return false
		}
	}
	var incs []int
	for i := range 4 {
		res := failOpen(t, srv.URL+"/hold?file=release", "pid=")
		line, err := readLine(res.Body)
		require.NoError(t, err)
		var pid, slot, inc int
		_, err = fmt.Sscanf("pid="+line, "pid=%d slot=%d inc=%d", &pid, &slot, &inc)
		require.NoError(t, err, line)
		incs = append(incs, inc)
		// A request answered: the child's MaxRequests.
		code, _ := fetch(t, srv.URL+"/id")
		require.Equal(t, http.StatusOK, code)
		if i == 0 {
			waitFor(t, 20*time.Second, "the first replacement", running(1))
		}
		assert.LessOrEqual(t, len(h.Stats().Children), 2, "children")
	}
	assert.Equal(t, []int{0, 1, 1, 1}, incs, "the incarnations that answered")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o644))
	waitFor(t, 20*time.Second, "the recycle that was due", running(2))
	exited0, recycling1 := -1, -1
	events.mu.Lock()
	for i, ev := range events.events {
		switch {
		case ev.Kind == ChildExited && ev.Incarnation == 0:
			exited0 = i
		case ev.Kind == ChildRecycling && ev.Incarnation == 1 && recycling1 < 0:
			recycling1 = i
		}
	}
	events.mu.Unlock()
	assert.Less(t, exited0, recycling1, "the first child exits before the second is recycled: %v", events.kinds())
}

// OnEvent sees a module's life in order, from one goroutine; a callback
// that blocks holds no request.
func TestPoolEvents(t *testing.T) {
	var events eventLog
	release := make(chan struct{})
	var once sync.Once
	h := startModule(t, "pool-mod", Options{
		HealthInterval: time.Hour,
		OnEvent: func(ev Event) {
			events.add(ev)
			if ev.Kind == ChildExited {
				<-release // a slow callback
			}
		},
	})
	defer once.Do(func() { close(release) })
	srv := serve(t, h)
	pid, _, _ := poolID(t, srv.URL)
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	// The callback is blocked on the exit; the module restarts and serves.
	waitFor(t, 20*time.Second, "a new child", func() bool { p := poolPids(h); return p[0] != 0 && p[0] != pid })
	for range 5 {
		poolID(t, srv.URL)
	}
	once.Do(func() { close(release) })
	require.NoError(t, h.Restart(context.Background()))
	require.NoError(t, h.Close())

	got := events.kinds()
	want := []string{
		"ChildStarted ",
		"ChildExited crash", "ModuleDegraded crash", "ChildStarted crash",
		"ChildRecycling restart", "ChildStarted restart", "ChildExited restart",
		"ChildExited shutdown",
	}
	assert.Equal(t, want, got)
	exit := events.first(ChildExited)
	assert.Equal(t, pid, exit.Pid)
	assert.Equal(t, "pool-mod", exit.Module)
	assert.Error(t, exit.Err)
	assert.False(t, exit.Time.IsZero())
}

// Env and Dir set the child's environment and working directory.
func TestPoolEnvAndDir(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "pool-mod", Options{
		Env: append(os.Environ(), "POOL_TEST_VAR=from-the-parent"),
		Dir: dir,
	})
	srv := serve(t, h)
	_, body := fetch(t, srv.URL+"/env?k=POOL_TEST_VAR")
	lines := strings.Split(body, "\n")
	require.Len(t, lines, 2)
	assert.Equal(t, "from-the-parent", lines[0])
	real, err := filepath.EvalSymlinks(dir)
	require.NoError(t, err)
	assert.Equal(t, real, lines[1])
	// Main takes its variable out of the child's environment.
	_, body = fetch(t, srv.URL+"/env?k="+envModule)
	assert.True(t, strings.HasPrefix(body, "\n"), "the module sees %s=%q", envModule, body)
}

// Restart with a context that has already ended returns the *StartError
// its doc promises, as one whose context ends while the new child starts
// does, and replaces nothing. (It returned a plain error.)
func TestRestartWithEndedContext(t *testing.T) {
	h := startModule(t, "pool-mod", Options{Children: 2, HealthInterval: time.Hour})
	before := pidsOf(h.Stats().Children)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := h.Restart(ctx)
	var se *StartError
	require.ErrorAs(t, err, &se)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, before, pidsOf(h.Stats().Children), "the children serving")
}

// A recycle whose replacement keeps failing to start is retried with a
// growing delay, while the old child serves on: each delay is a
// ModuleBackoff, as after a crash (OnEvent sees every backoff).
func TestPoolRecycleRetryBacksOff(t *testing.T) {
	var events eventLog
	h := startModule(t, "pool-mod", withConfig(t, poolConfig{RestartInitFail: true}, Options{
		MaxLifetime: 200 * time.Millisecond, OnEvent: events.add, HealthInterval: time.Hour,
	}))
	waitFor(t, 30*time.Second, "three failed replacements", func() bool { return events.count(ChildExited, "") >= 3 })
	failed := events.count(ChildExited, "")
	assert.GreaterOrEqual(t, events.count(ModuleBackoff, "backoff"), failed-1, "%d replacements failed, each retried after a delay: %v", failed, events.kinds())
	for _, ev := range events.all() {
		if ev.Kind == ModuleBackoff {
			assert.Positive(t, ev.Delay, "a backoff says how long")
		}
	}
	assert.Equal(t, 0, h.Stats().Incarnation, "the first child serves on")
}

// A request queued for a MaxInFlight place waits at most RestartWait in
// all: here its place frees, as the child serving the place dies, just
// before RestartWait, and the replacement takes longer than that to
// start. It gets its 503 at RestartWait, not after a second RestartWait
// of waiting for a child.
func TestAdmissionQueueWaitBoundsChildWait(t *testing.T) {
	const wait = 2 * time.Second
	h := startModule(t, "pool-mod", withConfig(t, poolConfig{Dir: t.TempDir(), RestartInitSleep: 3 * wait}, Options{
		MaxInFlight: 1, MaxQueued: 1, RestartWait: wait, HealthInterval: time.Hour,
	}))
	srv := serve(t, h)
	first := make(chan struct{})
	go func() {
		defer close(first)
		res, _, err := fetchErr(srv.URL+"/hold?file=never", time.Minute)
		if err == nil {
			res.Body.Close()
		}
	}()
	awaitStats(t, h, 10*time.Second, "the first request in flight", func(st Stats) bool { return st.InFlight == 1 })
	type answer struct {
		code int
		took time.Duration
	}
	second := make(chan answer, 1)
	go func() {
		start := time.Now()
		res, _, err := fetchErr(srv.URL+"/id", time.Minute)
		if err != nil {
			second <- answer{}
			return
		}
		second <- answer{res.StatusCode, time.Since(start)}
	}()
	waitFor(t, 10*time.Second, "the second request to queue", func() bool { return h.queued.Load() == 1 })
	time.Sleep(wait - 500*time.Millisecond) // the scenario: the place frees late in the wait
	require.NoError(t, syscall.Kill(firstChild(h).proc.Pid(), syscall.SIGKILL))
	<-first
	a := <-second
	assert.Equal(t, http.StatusServiceUnavailable, a.code)
	assert.Less(t, a.took, wait+wait/2, "the queued request waited %v in all; RestartWait is %v", a.took, wait)
}
