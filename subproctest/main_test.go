package subproctest_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/fbbf71ac/subproc/subproctest"
	"go.uber.org/goleak"
)

// envForgetMain, in a child's environment, makes this test binary behave
// as one whose TestMain forgot to call Main: its tests run, pass without
// a word, and it exits with status 0.
const envForgetMain = "SUBPROCTEST_FORGET_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(envForgetMain) != "" {
		fmt.Println("PASS") // what m.Run prints to stdout when the tests pass
		os.Exit(0)
	}
	subproctest.Main(m)
}

// The modules of these tests (and examples): "greeter" answers who served
// it; "pathvalues" what its request's pattern and path values are.
func init() {
	subproc.Register("greeter", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello from incarnation %d", env.Incarnation)
		})
		mux.HandleFunc("GET /pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, os.Getpid())
		})
		mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(time.Minute):
			}
		})
		return mux, nil
	})
}

// checkLeaks fails t if goroutines outlive its cleanups, those of Start
// included: call it first.
func checkLeaks(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
}
