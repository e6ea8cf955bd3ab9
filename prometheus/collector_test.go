package subprocprom_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	subprocprom "github.com/fbbf71ac/subproc/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	subproc.Main()
	// A binary built with -race sleeps a second at exit by default; the
	// children are such binaries too, and would make every stop slow.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}

// The test modules. Their names begin with "prom-".
func init() {
	subproc.Register("prom-test", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, "hello")
		})
		// /exit kills the child before it answers: a 502.
		mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
			os.Exit(3)
		})
		// /wait answers when its request's context ends: a 504 at a deadline.
		mux.HandleFunc("/wait", func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		})
		// /abort cuts its response off once it has started.
		mux.HandleFunc("/abort", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, "partial")
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		})
		return mux, nil
	})
}

// A fixture runs one module under a Collector, registered in a pedantic
// registry that promhttp serves, so that every scrape checks that the
// Collector's metrics are consistent (no duplicate series, every metric
// described).
type fixture struct {
	t       *testing.T
	h       *subproc.Handle
	c       *subprocprom.Collector
	app     *httptest.Server // serves the module
	metrics *httptest.Server // serves /metrics
	events  chan subproc.Event
	pids    chan int // of every ChildStarted event
}

// start starts module name with opts under a new Collector, which sees
// every event before the test's events channel does.
func start(t *testing.T, name string, opts subproc.Options) *fixture {
	t.Helper()
	f := &fixture{t: t, events: make(chan subproc.Event, 1000), pids: make(chan int, 1000)}
	f.c = subprocprom.NewCollector()
	opts.OnEvent = f.c.OnEvent(func(ev subproc.Event) {
		if ev.Kind == subproc.ChildStarted {
			f.pids <- ev.Pid
		}
		select {
		case f.events <- ev:
		default:
			t.Errorf("event dropped, the test's channel is full: %+v", ev)
		}
	})
	if opts.Stderr == nil {
		opts.Stderr = io.Discard
	}
	if opts.HealthInterval == 0 {
		opts.HealthInterval = 100 * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, err := subproc.Start(ctx, name, opts)
	require.NoError(t, err)
	f.h = h
	f.c.Add(h)
	t.Cleanup(f.stop)

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(f.c)
	f.metrics = httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}))
	t.Cleanup(f.metrics.Close)
	f.app = httptest.NewServer(h)
	t.Cleanup(f.app.Close)
	t.Cleanup(http.DefaultClient.CloseIdleConnections)
	return f
}

// stop shuts the module down, if the test has not, and checks that every
// child it started is gone.
func (f *fixture) stop() {
	t := f.t
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	assert.NoError(t, f.h.Shutdown(ctx))
	close(f.pids)
	for pid := range f.pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("child pid %d is still there after Shutdown (kill 0: %v)", pid, err)
		}
	}
	f.pids = make(chan int, 1000) // for a second stop's close
}

// waitEvent waits for an event that match accepts, and returns it.
func (f *fixture) waitEvent(what string, match func(subproc.Event) bool) subproc.Event {
	f.t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev := <-f.events:
			if match(ev) {
				return ev
			}
		case <-timeout:
			f.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// get GETs path from the module and returns the status and body; err is
// set if the response was cut off.
func (f *fixture) get(path string) (status int, body string, err error) {
	res, err := http.Get(f.app.URL + path)
	if err != nil {
		return 0, "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, string(b), err
}

// scrape fetches /metrics in Prometheus's text format and parses it.
func (f *fixture) scrape() scraped {
	f.t.Helper()
	req, err := http.NewRequest(http.MethodGet, f.metrics.URL, nil)
	require.NoError(f.t, err)
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	res, err := http.DefaultClient.Do(req)
	require.NoError(f.t, err)
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		f.t.Fatalf("GET /metrics: %s: %s", res.Status, b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(res.Body)
	require.NoError(f.t, err)
	return scraped{f.t, mfs}
}

// scraped is a parsed scrape.
type scraped struct {
	t   *testing.T
	mfs map[string]*dto.MetricFamily
}

// find returns the value of the series of metric name whose labels
// include labels, given as name, value pairs, and whether there is one.
func (s scraped) find(name string, labels ...string) (float64, bool) {
	s.t.Helper()
	mf := s.mfs[name]
	if mf == nil {
		return 0, false
	}
next:
	for _, m := range mf.Metric {
		have := make(map[string]string)
		for _, lp := range m.Label {
			have[lp.GetName()] = lp.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		}
		s.t.Fatalf("%s: neither a counter nor a gauge", name)
	}
	return 0, false
}

// value is find's value; the series must exist.
func (s scraped) value(name string, labels ...string) float64 {
	s.t.Helper()
	v, ok := s.find(name, labels...)
	if !ok {
		s.t.Fatalf("no series %s%v in the scrape", name, labels)
	}
	return v
}

// TestCollectorCrash scrapes a module through its life: serving, after a
// SIGKILL of its child, and after Shutdown.
func TestCollectorCrash(t *testing.T) {
	f := start(t, "prom-test", subproc.Options{})
	const m = "prom-test"
	for range 2 {
		status, body, err := f.get("/hello")
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, status, body)
	}
	_, err := f.h.HealthCheck(context.Background())
	require.NoError(t, err)
	if runtime.GOOS == "linux" {
		// Memory is read at the periodic checks: wait for the first.
		deadline := time.Now().Add(30 * time.Second)
		for f.h.Stats().Children[0].Memory == 0 {
			require.True(t, time.Now().Before(deadline), "no memory reading in 30s")
			time.Sleep(10 * time.Millisecond)
		}
	}

	s := f.scrape()
	assert.Equal(t, 1.0, s.value("subproc_ready", "module", m))
	assert.Equal(t, 1.0, s.value("subproc_module_state", "module", m, "state", "running"))
	assert.Equal(t, 0.0, s.value("subproc_module_state", "module", m, "state", "restarting"))
	assert.Equal(t, 1.0, s.value("subproc_children", "module", m, "state", "running"))
	assert.Equal(t, 0.0, s.value("subproc_children", "module", m, "state", "draining"))
	assert.Equal(t, 0.0, s.value("subproc_in_flight", "module", m))
	assert.Equal(t, 2.0, s.value("subproc_requests_total", "module", m))
	assert.Equal(t, 0.0, s.value("subproc_request_failures_total", "module", m, "outcome", "bad_gateway"))
	assert.Equal(t, 0.0, s.value("subproc_restarts_total", "module", m))
	assert.Equal(t, 0.0, s.value("subproc_child_exits_total", "module", m, "reason", "crash"))
	assert.Equal(t, 0.0, s.value("subproc_child_in_flight", "module", m, "slot", "0"))
	assert.Equal(t, 0.0, s.value("subproc_child_failed_health_checks", "module", m, "slot", "0"))
	rtt := s.value("subproc_child_health_rtt_seconds", "module", m, "slot", "0")
	assert.True(t, rtt > 0 && rtt < 30, "health round trip %vs", rtt)
	started := s.value("subproc_child_start_time_seconds", "module", m, "slot", "0")
	assert.InDelta(t, float64(time.Now().Unix()), started, 120)
	if runtime.GOOS == "linux" {
		mem := s.value("subproc_child_resident_memory_bytes", "module", m, "slot", "0")
		assert.True(t, mem > 1<<20 && mem < 1<<30, "resident memory %v bytes", mem)
	}
	for name, mf := range s.mfs {
		for _, series := range mf.Metric {
			for _, lp := range series.Label {
				assert.NotEqual(t, "pid", lp.GetName(), "%s has a pid label", name)
			}
		}
	}

	pid := f.h.Stats().Children[0].Pid
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	f.waitEvent("the killed child's exit", func(ev subproc.Event) bool {
		return ev.Kind == subproc.ChildExited && ev.Pid == pid
	})
	f.waitEvent("its replacement", func(ev subproc.Event) bool {
		return ev.Kind == subproc.ChildStarted && ev.Pid != pid
	})

	s = f.scrape()
	assert.Equal(t, 1.0, s.value("subproc_child_exits_total", "module", m, "reason", "crash"))
	assert.Equal(t, 0.0, s.value("subproc_child_exits_total", "module", m, "reason", "health"))
	assert.Equal(t, 1.0, s.value("subproc_restarts_total", "module", m))
	assert.Equal(t, 1.0, s.value("subproc_children", "module", m, "state", "running"))
	assert.Equal(t, 1.0, s.value("subproc_ready", "module", m))
	assert.Equal(t, 2.0, s.value("subproc_requests_total", "module", m))

	f.stop()
	s = f.scrape()
	assert.Equal(t, 1.0, s.value("subproc_module_state", "module", m, "state", "stopped"))
	assert.Equal(t, 0.0, s.value("subproc_ready", "module", m))
	for _, state := range []string{"starting", "running", "unhealthy", "draining"} {
		assert.Equal(t, 0.0, s.value("subproc_children", "module", m, "state", state), state)
	}
	assert.Equal(t, 1.0, s.value("subproc_child_exits_total", "module", m, "reason", "shutdown"))
	_, ok := s.find("subproc_child_in_flight", "module", m)
	assert.False(t, ok, "a stopped module still has per-slot series")
}

// TestCollectorFailures counts each outcome of a failed request.
func TestCollectorFailures(t *testing.T) {
	const m = "prom-test"
	f := start(t, m, subproc.Options{})
	want := map[string]float64{"bad_gateway": 0, "unavailable": 0, "timeout": 0, "aborted": 0}
	for _, step := range []struct {
		outcome string
		do      func(t *testing.T)
	}{
		{"bad_gateway", func(t *testing.T) {
			status, _, err := f.get("/exit")
			require.NoError(t, err)
			assert.Equal(t, http.StatusBadGateway, status)
		}},
		{"timeout", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			r := httptest.NewRequestWithContext(ctx, http.MethodGet, "/wait", nil)
			w := httptest.NewRecorder()
			f.h.ServeHTTP(w, r)
			assert.Equal(t, http.StatusGatewayTimeout, w.Code)
		}},
		{"aborted", func(t *testing.T) {
			_, body, err := f.get("/abort")
			assert.Error(t, err, "the response was not cut off: %q", body)
		}},
		{"unavailable", func(t *testing.T) {
			f.stop()
			w := httptest.NewRecorder()
			f.h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/hello", nil))
			assert.Equal(t, http.StatusServiceUnavailable, w.Code)
		}},
	} {
		t.Run(step.outcome, func(t *testing.T) {
			step.do(t)
			want[step.outcome]++
			s := f.scrape()
			for outcome, n := range want {
				assert.Equal(t, n, s.value("subproc_request_failures_total", "module", m, "outcome", outcome), outcome)
			}
		})
	}
	s := f.scrape()
	// The child that died at /exit, whose replacement answered the rest.
	assert.Equal(t, 1.0, s.value("subproc_child_exits_total", "module", m, "reason", "crash"))
	// The aborted response was the child's own doing: it was answered.
	// So may the timed-out one have been, if the child ended it before
	// the parent let it go.
	n := s.value("subproc_requests_total", "module", m)
	assert.True(t, n == 1 || n == 2, "subproc_requests_total %v, want 1 or 2", n)
}

// TestCollectorRestart scrapes a pool while Restart replaces its
// children, when a slot holds two, and checks the recycles.
func TestCollectorRestart(t *testing.T) {
	const m = "prom-test"
	f := start(t, m, subproc.Options{Children: 2})
	s := f.scrape()
	assert.Equal(t, 2.0, s.value("subproc_children", "module", m, "state", "running"))
	for _, slot := range []string{"0", "1"} {
		s.value("subproc_child_in_flight", "module", m, "slot", slot)
	}

	done := make(chan error, 1)
	go func() { done <- f.h.Restart(context.Background()) }()
	scrapes, overlapped := 0, false
	for restarting := true; restarting; {
		select {
		case err := <-done:
			require.NoError(t, err)
			restarting = false
		default:
		}
		// Every scrape must be consistent, a slot with two children too:
		// the pedantic registry and promhttp fail it otherwise.
		st := f.h.Stats()
		s := f.scrape()
		scrapes++
		if len(st.Children) > 2 {
			overlapped = true
		}
		for _, cs := range st.Children {
			_, ok := s.find("subproc_child_in_flight", "module", m, "slot", strconv.Itoa(cs.Slot))
			assert.True(t, ok, "slot %d missing", cs.Slot)
		}
	}
	t.Logf("%d scrapes during Restart; saw a slot with two children: %v", scrapes, overlapped)

	f.waitEvent("the second old child's exit", func(ev subproc.Event) bool {
		return ev.Kind == subproc.ChildExited && ev.Incarnation == 1
	})
	s = f.scrape()
	assert.Equal(t, 2.0, s.value("subproc_child_recycles_total", "module", m, "reason", "restart"))
	assert.Equal(t, 2.0, s.value("subproc_child_exits_total", "module", m, "reason", "restart"))
	assert.Equal(t, 0.0, s.value("subproc_restarts_total", "module", m), "a graceful replacement counted as a restart")
	assert.Equal(t, 2.0, s.value("subproc_children", "module", m, "state", "running"))
}

func TestCollectorLint(t *testing.T) {
	f := start(t, "prom-test", subproc.Options{})
	_, err := f.h.HealthCheck(context.Background())
	require.NoError(t, err)
	problems, err := testutil.CollectAndLint(f.c)
	require.NoError(t, err)
	assert.Empty(t, problems)
}

func TestCollectorAddRemove(t *testing.T) {
	f := start(t, "prom-test", subproc.Options{})
	f.c.Add(f.h) // again: no effect
	assert.Equal(t, 1.0, f.scrape().value("subproc_ready", "module", "prom-test"))

	// Another handle of the same module: its series would clash.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h2, err := subproc.Start(ctx, "prom-test", subproc.Options{Stderr: io.Discard})
	require.NoError(t, err)
	defer h2.Close()
	assert.PanicsWithValue(t, `subprocprom: Collector.Add: the Collector already has a Handle of module "prom-test"; Remove it first, or give the modules distinct names`, func() { f.c.Add(h2) })

	// Removed, the handle's series go; the module's event counters stay.
	f.c.Remove(f.h)
	f.c.Remove(f.h) // again: no effect
	s := f.scrape()
	_, ok := s.find("subproc_ready", "module", "prom-test")
	assert.False(t, ok)
	s.value("subproc_child_exits_total", "module", "prom-test", "reason", "crash")
	f.c.Add(h2)
	assert.Equal(t, 1.0, f.scrape().value("subproc_ready", "module", "prom-test"))

	// Events of a module the Collector has no handle of are reported.
	f.c.Observe(subproc.Event{Module: "prom-elsewhere", Kind: subproc.ChildExited, Reason: "memory"})
	f.c.Observe(subproc.Event{Module: "prom-elsewhere", Kind: subproc.ModuleBackoff, Reason: "backoff"})
	s = f.scrape()
	assert.Equal(t, 1.0, s.value("subproc_child_exits_total", "module", "prom-elsewhere", "reason", "memory"))
	assert.Equal(t, 1.0, s.value("subproc_backoffs_total", "module", "prom-elsewhere"))
}
