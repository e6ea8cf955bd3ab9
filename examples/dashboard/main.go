// Command dashboard is a small web dashboard whose API is served by subproc
// modules, each in its own child process:
//
//   - logs appends a line to a file every 500ms and serves its tail and a
//     live stream of it, also as a WebSocket, served in its child, that
//     takes marks to append: the page's live log;
//   - chaos runs in a pool of children (three by default, each replaced
//     after about 100 requests) and has endpoints that crash, panic, hang
//     or otherwise abuse the child that serves them, so that you can watch
//     the parent notice, fail only that child's requests, and start a new
//     child in its slot while the others serve on. Its limits are set:
//     a child that leaks past -memory-high is replaced (past -memory-max,
//     killed), and one whose handler runs on -stuck after its request was
//     given up is found stuck, its goroutine stacks written to chaos.log,
//     and replaced.
//
// The parent serves the page at /, the state of every module, child and
// recent event at /api/state, the same pushed as it changes at /api/live
// (server-sent events, with each module's last five minutes of requests/s,
// p50/p99 latency, memory by slot and ended children, which the parent
// measures itself: see live.go and metrics.go), a rolling restart of a
// module at POST /api/modules/{name}/restart, a readiness probe at /readyz
// (see server.go), and every module's metrics for Prometheus at /metrics
// (the collector of github.com/fbbf71ac/subproc/prometheus, with the Go
// runtime's and the process's); everything under /api/logs and /api/chaos
// is forwarded to a module's child, the WebSocket of the page's live log,
// GET /api/logs/ws, included (see logsws.go). Run it with
//
//	go run ./examples/dashboard
//
// and open the URL it prints. Ctrl-C stops it and its children. The page
// draws its charts as inline SVG with a few lines of plain JavaScript: it
// loads nothing from elsewhere. A browser test of the page, in a module of
// its own so that chromedp stays out of the library's go.mod, is in
// browsertest/.
package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc"
	subprocprom "github.com/fbbf71ac/subproc/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// shutdownTimeout bounds how long a Ctrl-C waits for in-flight requests,
// first in the HTTP server, then in each module.
const shutdownTimeout = 10 * time.Second

//go:embed index.html
var indexHTML []byte

// A route forwards one path and method to a module.
type route struct {
	module string
	method string
	path   string
}

// routes lists every endpoint the modules serve. Each is mounted with
// Handle.Route, which answers another method with 405 and an Allow header.
var routes = []route{
	{"logs", http.MethodGet, "/api/logs/tail"},
	{"logs", http.MethodGet, "/api/logs/stream"},
	{"logs", http.MethodGet, "/api/logs/ws"},
	{"chaos", http.MethodGet, "/api/chaos/hello"},
	{"chaos", http.MethodPost, "/api/chaos/crash"},
	{"chaos", http.MethodPost, "/api/chaos/panic"},
	{"chaos", http.MethodPost, "/api/chaos/hang"},
	{"chaos", http.MethodPost, "/api/chaos/spin"},
	{"chaos", http.MethodPost, "/api/chaos/print"},
	{"chaos", http.MethodPost, "/api/chaos/fail-next-start"},
	{"chaos", http.MethodPost, "/api/chaos/leak"},
	{"chaos", http.MethodPost, "/api/chaos/stuck"},
}

// streamingPaths are the routes whose responses never end by themselves.
// Their requests are canceled when the server shuts down, so that the
// shutdown does not wait for them. (GET /api/logs/ws is not one: once its
// connection is hijacked, the server no longer waits for it, and the logs
// module ends it when its child drains.)
var streamingPaths = map[string]bool{"/api/logs/stream": true, "/api/chaos/leak": true}

// unmeasured are the routes that never end by themselves and so have no
// latency to chart.
var unmeasured = map[string]bool{"/api/logs/stream": true, "/api/logs/ws": true}

// moduleNames is the order in which modules are started and listed.
var moduleNames = []string{"logs", "chaos"}

// config is what run needs to know: where to serve and log, and the shape
// of the chaos module's pool.
type config struct {
	addr        string        // the address to serve on; see listen
	logdir      string        // Options.LogDir of every module; it must exist
	poolSize    int           // Options.Children of the chaos module
	maxRequests int           // Options.MaxRequests of the chaos module; 0: no limit
	drainGrace  time.Duration // Options.ShutdownTimeout of every module: how long a replaced child's requests may run on

	// The chaos module's limits; zero: none (StuckTimeout: the default).
	memoryHigh   int64         // Options.MemoryHigh, bytes
	memoryMax    int64         // Options.MemoryMax, bytes
	stuckTimeout time.Duration // Options.StuckTimeout
}

func main() {
	// In a child process started by subproc.Start, Main runs the module and
	// never returns. It must come before anything else.
	subproc.Main()

	var cfg config
	flag.StringVar(&cfg.addr, "addr", "localhost:8080", "address to serve on; if its port is busy, a free port is used")
	flag.StringVar(&cfg.logdir, "logdir", filepath.Join(os.TempDir(), "subproc-dashboard-logs"), "directory for the modules' log files")
	flag.IntVar(&cfg.poolSize, "children", 3, "child processes of the chaos module")
	flag.IntVar(&cfg.maxRequests, "max-requests", 100, "requests a chaos child answers before it is replaced; 0 means no limit")
	flag.DurationVar(&cfg.drainGrace, "drain", 5*time.Second, "how long a replaced child's requests may run on before they are canceled")
	memHigh := flag.Int64("memory-high", 200, "MiB of resident memory past which a chaos child is replaced; 0 means no limit")
	memMax := flag.Int64("memory-max", 400, "MiB of resident memory past which a chaos child is killed; 0 means no limit")
	flag.DurationVar(&cfg.stuckTimeout, "stuck", 3*time.Second, "how long a chaos handler may run on after its request was given up before its child counts as stuck")
	flag.Parse()
	cfg.memoryHigh, cfg.memoryMax = *memHigh<<20, *memMax<<20
	log.SetFlags(0)
	log.SetPrefix("dashboard: ")
	if cfg.poolSize < 1 || cfg.maxRequests < 0 || cfg.drainGrace <= 0 || *memHigh < 0 || *memMax < 0 || cfg.stuckTimeout <= 0 {
		log.Fatal("-children must be 1 or more, -max-requests, -memory-high and -memory-max 0 or more, -drain and -stuck more than 0")
	}

	if err := os.MkdirAll(cfg.logdir, 0o755); err != nil {
		log.Fatal(err)
	}
	log.Printf("module logs in %s", cfg.logdir)

	// The first Ctrl-C (or SIGTERM) starts a graceful shutdown; once it
	// has begun, a second Ctrl-C kills the program at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)

	err := run(ctx, cfg, func(url string) {
		log.Printf("serving on %s (Ctrl-C to stop)", url)
	})
	if err != nil {
		// A *subproc.StartError says which module failed, why, and
		// what it printed last.
		log.Print(err)
		os.Exit(1)
	}
	log.Print("stopped")
}

// run starts the modules, serves the dashboard on cfg.addr until ctx ends,
// then shuts the server and the modules down. It calls ready with the
// server's URL once it accepts requests. It returns nil after a clean
// shutdown.
func run(ctx context.Context, cfg config, ready func(url string)) (err error) {
	ln, err := listen(cfg.addr)
	if err != nil {
		return err
	}
	defer ln.Close() // in case serving never starts

	// events outlives the modules: their last events arrive before
	// stopModules returns.
	events := new(eventRing)
	// The collector counts the events, so it exists before the modules
	// start; it reads their Stats at each scrape.
	collector := subprocprom.NewCollector()
	modules, err := startModules(ctx, cfg, collector.OnEvent(events.add))
	if err != nil {
		return err
	}
	for _, m := range modules {
		collector.Add(m.h)
	}
	// The modules stop after the HTTP server, which stops first so that
	// no new requests reach them.
	defer func() { err = errors.Join(err, stopModules(modules)) }()

	// closing is canceled when shutdown begins; it ends the requests of
	// the streaming routes, which http.Server.Shutdown would otherwise
	// wait for until its timeout, and restarts under way.
	closing, beginClosing := context.WithCancel(context.Background())
	defer beginClosing()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	newServer(modules, events, closing).register(mux)
	mux.Handle("GET /metrics", metricsHandler(collector))
	byName := make(map[string]*module)
	for _, m := range modules {
		byName[m.name] = m
	}
	for _, rt := range routes {
		m := byName[rt.module]
		var h http.Handler = m.h.Route(rt.path, rt.method)
		if !unmeasured[rt.path] {
			h = measure(m.metrics, h)
		}
		if streamingPaths[rt.path] {
			h = endOnShutdown(closing, h)
		}
		mux.Handle(rt.path, h)
	}
	// The sampler ends with the server, before the modules stop.
	sampling, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		sampleLoop(sampling, modules)
	}()
	defer func() {
		stopSampling()
		<-sampled
	}()

	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	ready("http://" + ln.Addr().String() + "/")

	select {
	case err = <-served:
		// Serve failed by itself; there is nothing to shut down.
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
	}
	log.Print("shutting down")
	beginClosing()
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutting down the HTTP server: %w", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serving: %w", err)
	}
	return nil
}

// listen listens on addr, or on a free port of localhost if addr's port is
// already in use.
func listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		log.Printf("%s is in use; using a free port instead", addr)
		ln, err = net.Listen("tcp", "localhost:0")
	}
	return ln, err
}

// startModules starts every module, with its logs in cfg.logdir and its
// events sent to onEvent. If one fails to start, it stops those already
// started and returns the *subproc.StartError.
func startModules(ctx context.Context, cfg config, onEvent func(subproc.Event)) ([]*module, error) {
	logsCfg, err := json.Marshal(logsConfig{File: filepath.Join(cfg.logdir, "events.txt")})
	if err != nil {
		return nil, err
	}
	chaosCfg := chaosConfig{FailMarker: filepath.Join(cfg.logdir, "chaos.fail-next-start")}
	// A marker left by an earlier run would fail this start.
	if err := os.Remove(chaosCfg.FailMarker); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	chaosJSON, err := json.Marshal(chaosCfg)
	if err != nil {
		return nil, err
	}
	var modules []*module
	for _, name := range moduleNames {
		opts := subproc.Options{
			LogDir: cfg.logdir,
			// Check often, so that a hung child is noticed, killed and
			// restarted within about two seconds.
			HealthInterval: 500 * time.Millisecond,
			HealthTimeout:  500 * time.Millisecond,
			HealthFailures: 3,
			// Requests that arrive while a module restarts wait this
			// long for the new child, then get 503.
			RestartWait: 5 * time.Second,
			// A new child (at a restart too) must be ready this soon.
			StartTimeout:    10 * time.Second,
			ShutdownTimeout: cfg.drainGrace,
		}
		slots := 1
		if name == "chaos" {
			slots = cfg.poolSize
		}
		metrics := newModuleMetrics(slots)
		opts.OnEvent = func(ev subproc.Event) {
			if ev.Kind == subproc.ChildExited {
				metrics.childEnded(ev.Time)
			}
			onEvent(ev)
		}
		switch name {
		case "logs":
			opts.Config = logsCfg
		case "chaos":
			opts.Config = chaosJSON
			opts.Children = cfg.poolSize
			opts.MaxRequests = cfg.maxRequests
			opts.MemoryHigh = cfg.memoryHigh
			opts.MemoryMax = cfg.memoryMax
			opts.StuckTimeout = cfg.stuckTimeout
		}
		h, err := subproc.Start(ctx, name, opts)
		if err != nil {
			stopModules(modules)
			return nil, err
		}
		modules = append(modules, &module{name: name, h: h, opts: opts, metrics: metrics})
	}
	return modules, nil
}

// stopModules shuts every module down, giving in-flight requests up to
// shutdownTimeout in all before their children are killed.
func stopModules(modules []*module) error {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	errs := make(chan error, len(modules))
	for _, m := range modules {
		go func() { errs <- m.h.Shutdown(ctx) }()
	}
	var err error
	for range modules {
		err = errors.Join(err, <-errs)
	}
	return err
}

// metricsHandler serves the metrics of collector, the Go runtime and the
// process, in a registry of their own, in the Prometheus formats.
func metricsHandler(collector *subprocprom.Collector) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

// endOnShutdown cancels the requests h serves when stop is canceled.
func endOnShutdown(stop context.Context, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		defer context.AfterFunc(stop, cancel)()
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}
