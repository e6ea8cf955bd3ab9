// Command example serves a subproc module, in a pool of two child
// processes, and its Prometheus metrics at /metrics:
//
//	cd prometheus && go run ./example -addr 127.0.0.1:8080
//	curl 127.0.0.1:8080/hello
//	curl 127.0.0.1:8080/crash     # the child dies: 502, and a restart
//	curl 127.0.0.1:8080/metrics
//
// It lives in the prometheus module, not beside the dashboard in the
// library's module, so that the library's go.mod does not depend on
// client_golang.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc"
	subprocprom "github.com/fbbf71ac/subproc/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func init() {
	subproc.Register("hello", newHello)
}

// newHello is the module: it greets, and dies on request.
func newHello(ctx context.Context, env *subproc.Env) (http.Handler, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from child %d (slot %d, incarnation %d)\n", os.Getpid(), env.Slot, env.Incarnation)
	})
	mux.HandleFunc("GET /crash", func(w http.ResponseWriter, r *http.Request) {
		env.Logger.Warn("crashing on request")
		os.Exit(1)
	})
	return mux, nil
}

func main() {
	subproc.Main() // in a child, runs the module and exits
	addr := flag.String("addr", "127.0.0.1:8080", "the address to serve on")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("serving on http://%s: /hello, /crash, /metrics", ln.Addr())
	if err := run(ctx, ln); err != nil {
		log.Fatal(err)
	}
}

// run serves the module and /metrics on ln until ctx ends, then shuts
// both down.
func run(ctx context.Context, ln net.Listener) error {
	c := subprocprom.NewCollector()
	h, err := subproc.Start(ctx, "hello", subproc.Options{
		Children: 2,
		OnEvent: c.OnEvent(func(ev subproc.Event) {
			log.Printf("event: %s pid %d reason %q", ev.Kind, ev.Pid, ev.Reason)
		}),
	})
	if err != nil {
		ln.Close()
		return err
	}
	c.Add(h)

	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.Handle("/", h)
	srv := &http.Server{Handler: mux}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err = <-served:
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil && err == nil {
		err = serr
	}
	if herr := h.Shutdown(sctx); herr != nil && err == nil {
		err = herr
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
