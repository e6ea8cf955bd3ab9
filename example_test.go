package subproc_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"

	"github.com/fbbf71ac/subproc"
)

// In a program, modules are registered in init functions, so that the
// re-executed child sees the same registrations as the parent.
func init() {
	subproc.Register("greeter", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		env.Logger.Info("greeter starting", "incarnation", env.Incarnation)
		mux := http.NewServeMux()
		mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello, %s, from a child process", r.URL.Query().Get("name"))
		})
		return mux, nil
	})
	subproc.Register("broken", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return nil, errors.New("cannot open the database")
	})
}

// This example runs a module in a child process and sends it a request. A
// real program's main would begin with subproc.Main(); here TestMain does.
func Example() {
	ctx := context.Background()
	h, err := subproc.Start(ctx, "greeter", subproc.Options{Stderr: io.Discard})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()

	mux := http.NewServeMux()
	mux.Handle("/hello", h.Route("/hello", http.MethodGet))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	res, err := http.Get(srv.URL + "/hello?name=gopher")
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	fmt.Println(res.StatusCode, string(body))

	res, err = http.Post(srv.URL+"/hello", "text/plain", nil)
	if err != nil {
		log.Fatal(err)
	}
	res.Body.Close()
	fmt.Println(res.StatusCode, res.Header.Get("Allow"))
	// Output:
	// 200 hello, gopher, from a child process
	// 405 GET, HEAD
}

// A module whose ModuleFunc fails makes Start return its error.
func ExampleStart_initError() {
	_, err := subproc.Start(context.Background(), "broken", subproc.Options{Stderr: io.Discard})
	var se *subproc.StartError
	if errors.As(err, &se) {
		fmt.Println(se.Module, "->", se.Err)
	}
	// Output: broken -> cannot open the database
}

// Start with a name that was never registered fails at once.
func ExampleStart_notRegistered() {
	_, err := subproc.Start(context.Background(), "nosuch", subproc.Options{})
	fmt.Println(errors.Is(err, subproc.ErrNotRegistered))
	// Output: true
}

// HealthCheck pings the child once.
func ExampleHandle_HealthCheck() {
	h, err := subproc.Start(context.Background(), "greeter", subproc.Options{Stderr: io.Discard})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	rtt, err := h.HealthCheck(context.Background())
	fmt.Println(err == nil && rtt > 0)
	// Output: true
}

// Main is the first statement of a program's main.
func ExampleMain() {
	// func main() {
	subproc.Main() // in a child started by Start, runs the module and exits
	// ... the program's own main follows: Start modules, serve HTTP.
	fmt.Fprintln(os.Stdout, "not a child")
	// }
	// Output: not a child
}

// A pool of children serves one module; Restart replaces them one at a
// time, and requests keep being answered throughout.
func ExampleHandle_Restart() {
	h, err := subproc.Start(context.Background(), "greeter", subproc.Options{Children: 2, Stderr: io.Discard})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	before := map[int]bool{}
	for _, c := range h.Stats().Children {
		before[c.Pid] = true
	}
	if err := h.Restart(context.Background()); err != nil {
		log.Fatal(err)
	}
	replaced := 0
	for _, c := range h.Stats().Children {
		if !before[c.Pid] {
			replaced++
		}
	}
	fmt.Println("children replaced:", replaced)
	// Output: children replaced: 2
}

// OnEvent sees every start, exit and restart, in order, from one
// goroutine.
func ExampleOptions_onEvent() {
	events := make(chan subproc.Event, 16)
	h, err := subproc.Start(context.Background(), "greeter", subproc.Options{
		Stderr:  io.Discard,
		OnEvent: func(ev subproc.Event) { events <- ev },
	})
	if err != nil {
		log.Fatal(err)
	}
	h.Close() // the last event is delivered before Close returns
	close(events)
	for ev := range events {
		if ev.Reason == "" {
			fmt.Println(ev.Kind)
		} else {
			fmt.Println(ev.Kind, ev.Reason)
		}
	}
	// Output:
	// ChildStarted
	// ChildExited shutdown
}

// Ready answers a readiness probe: true while a child serves and the
// handle is not shutting down.
func ExampleHandle_Ready() {
	h, err := subproc.Start(context.Background(), "greeter", subproc.Options{Stderr: io.Discard})
	if err != nil {
		log.Fatal(err)
	}
	readyz := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !h.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
		}
	})
	rec := httptest.NewRecorder()
	readyz.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	fmt.Println(rec.Code)
	h.Close()
	rec = httptest.NewRecorder()
	readyz.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	fmt.Println(rec.Code)
	// Output:
	// 200
	// 503
}
