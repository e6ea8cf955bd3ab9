package subprocprom_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/fbbf71ac/subproc"
	subprocprom "github.com/fbbf71ac/subproc/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func init() {
	subproc.Register("prom-example", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, "hello from a child process")
		}), nil
	})
}

// This example serves a module and its metrics. The Collector exists
// before Start, so that it sees the module's events from the first; the
// Handle is added once Start has returned it. A real program's main would
// begin with subproc.Main(); here TestMain does.
func ExampleCollector() {
	c := subprocprom.NewCollector()
	h, err := subproc.Start(context.Background(), "prom-example", subproc.Options{
		Stderr:  io.Discard,
		OnEvent: c.OnEvent(nil), // or c.OnEvent(yourOwnOnEvent)
	})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	c.Add(h)

	reg := prometheus.NewRegistry() // or prometheus.MustRegister(c) and promhttp.Handler()
	reg.MustRegister(c)
	mux := http.NewServeMux()
	mux.Handle("/hello", h)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	res, err := http.Get(srv.URL + "/hello")
	if err != nil {
		log.Fatal(err)
	}
	res.Body.Close()

	res, err = http.Get(srv.URL + "/metrics")
	if err != nil {
		log.Fatal(err)
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "subproc_requests_total") ||
			strings.HasPrefix(line, `subproc_children{module="prom-example",state="running"}`) ||
			strings.HasPrefix(line, `subproc_child_exits_total{module="prom-example",reason="crash"}`) {
			fmt.Println(line)
		}
	}
	// Output:
	// subproc_child_exits_total{module="prom-example",reason="crash"} 0
	// subproc_children{module="prom-example",state="running"} 1
	// subproc_requests_total{module="prom-example"} 1
}
