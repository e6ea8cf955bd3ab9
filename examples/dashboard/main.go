// Command dashboard is a small web dashboard whose API is served by subproc
// modules, each in its own child process:
//
//   - logs appends a line to a file every 500ms and serves its tail and a
//     live stream of it;
//   - chaos has endpoints that crash, panic, hang or otherwise abuse its
//     child on purpose, so that you can watch the parent notice and restart
//     it.
//
// The parent serves the page at / and /api/modules (the state of every
// module); everything under /api/logs and /api/chaos is forwarded to a
// module's child. Run it with
//
//	go run ./examples/dashboard
//
// and open the URL it prints. Ctrl-C stops it and its children.
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
	{"chaos", http.MethodGet, "/api/chaos/hello"},
	{"chaos", http.MethodPost, "/api/chaos/crash"},
	{"chaos", http.MethodPost, "/api/chaos/panic"},
	{"chaos", http.MethodPost, "/api/chaos/hang"},
	{"chaos", http.MethodPost, "/api/chaos/spin"},
	{"chaos", http.MethodPost, "/api/chaos/print"},
}

// streamingPaths are the routes whose responses never end by themselves.
// Their requests are canceled when the server shuts down, so that the
// shutdown does not wait for them.
var streamingPaths = map[string]bool{"/api/logs/stream": true}

// moduleNames is the order in which modules are started and listed.
var moduleNames = []string{"logs", "chaos"}

func main() {
	// In a child process started by subproc.Start, Main runs the module and
	// never returns. It must come before anything else.
	subproc.Main()

	addr := flag.String("addr", "localhost:8080", "address to serve on; if its port is busy, a free port is used")
	logdir := flag.String("logdir", filepath.Join(os.TempDir(), "subproc-dashboard-logs"), "directory for the modules' log files")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("dashboard: ")

	if err := os.MkdirAll(*logdir, 0o755); err != nil {
		log.Fatal(err)
	}
	log.Printf("module logs in %s", *logdir)

	// The first Ctrl-C (or SIGTERM) starts a graceful shutdown; once it
	// has begun, a second Ctrl-C kills the program at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)

	err := run(ctx, *addr, *logdir, func(url string) {
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

// run starts the modules, serves the dashboard on addr until ctx ends, then
// shuts the server and the modules down. It calls ready with the server's
// URL once it accepts requests. It returns nil after a clean shutdown.
func run(ctx context.Context, addr, logdir string, ready func(url string)) (err error) {
	ln, err := listen(addr)
	if err != nil {
		return err
	}
	defer ln.Close() // in case serving never starts

	handles, err := startModules(ctx, logdir)
	if err != nil {
		return err
	}
	// The modules stop after the HTTP server, which stops first so that
	// no new requests reach them.
	defer func() { err = errors.Join(err, stopModules(handles)) }()

	// streams is canceled when shutdown begins; it ends the requests of
	// the streaming routes, which http.Server.Shutdown would otherwise
	// wait for until its timeout.
	streams, endStreams := context.WithCancel(context.Background())
	defer endStreams()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	mux.HandleFunc("GET /api/modules", func(w http.ResponseWriter, r *http.Request) {
		serveModules(w, handles)
	})
	for _, rt := range routes {
		var h http.Handler = handles[rt.module].Route(rt.path, rt.method)
		if streamingPaths[rt.path] {
			h = endOnShutdown(streams, h)
		}
		mux.Handle(rt.path, h)
	}

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
	endStreams()
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

// startModules starts every module, with its logs in logdir. If one fails to
// start, it stops those already started and returns the *subproc.StartError.
func startModules(ctx context.Context, logdir string) (map[string]*subproc.Handle, error) {
	config, err := json.Marshal(logsConfig{File: filepath.Join(logdir, "events.txt")})
	if err != nil {
		return nil, err
	}
	handles := make(map[string]*subproc.Handle)
	for _, name := range moduleNames {
		opts := subproc.Options{
			LogDir: logdir,
			// Check often, so that a hung child is noticed, killed and
			// restarted within about two seconds.
			HealthInterval: 500 * time.Millisecond,
			HealthTimeout:  500 * time.Millisecond,
			HealthFailures: 3,
			// Requests that arrive while a module restarts wait this
			// long for the new child, then get 503.
			RestartWait: 5 * time.Second,
		}
		if name == "logs" {
			opts.Config = config
		}
		h, err := subproc.Start(ctx, name, opts)
		if err != nil {
			stopModules(handles)
			return nil, err
		}
		handles[name] = h
	}
	return handles, nil
}

// stopModules shuts every module down, giving in-flight requests up to
// shutdownTimeout in all before their children are killed.
func stopModules(handles map[string]*subproc.Handle) error {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	errs := make(chan error, len(handles))
	for _, h := range handles {
		go func() { errs <- h.Shutdown(ctx) }()
	}
	var err error
	for range handles {
		err = errors.Join(err, <-errs)
	}
	return err
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

// moduleStatus is one module's row in GET /api/modules.
type moduleStatus struct {
	Name        string `json:"name"`
	State       string `json:"state"`
	Pid         int    `json:"pid"`
	Incarnation int    `json:"incarnation"`
	Restarts    int    `json:"restarts"`
	InFlight    int    `json:"inFlight"`
	LastHealth  string `json:"lastHealth"` // round trip of the last good health check, e.g. "412µs"
	LastExit    string `json:"lastExit"`   // how the last child ended; "" if none has
}

// serveModules answers GET /api/modules with the state of every module.
func serveModules(w http.ResponseWriter, handles map[string]*subproc.Handle) {
	list := make([]moduleStatus, 0, len(handles))
	for _, name := range moduleNames {
		st := handles[name].Stats()
		ms := moduleStatus{
			Name:        st.Module,
			State:       st.State,
			Pid:         st.Pid,
			Incarnation: st.Incarnation,
			Restarts:    st.Restarts,
			InFlight:    st.InFlight,
			LastExit:    st.LastExit,
		}
		if st.LastHealth > 0 {
			ms.LastHealth = st.LastHealth.Round(time.Microsecond).String()
		}
		list = append(list, ms)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(list)
}
