package subproctest_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/fbbf71ac/subproc/subproctest"
)

// exampleT stands, in the examples, for the *testing.T of a test: a
// failure ends the example, and finish runs the cleanups, as the end of a
// test does.
type exampleT struct {
	testing.TB // nil: only the methods below are called
	cleanups   []func()
}

func (t *exampleT) Helper()                           {}
func (t *exampleT) Context() context.Context          { return context.Background() }
func (t *exampleT) Cleanup(f func())                  { t.cleanups = append(t.cleanups, f) }
func (t *exampleT) Logf(format string, args ...any)   {}
func (t *exampleT) Errorf(format string, args ...any) { fmt.Printf("FAIL: "+format+"\n", args...) }
func (t *exampleT) Fatalf(format string, args ...any) { log.Fatalf("FAIL: "+format, args...) }
func (t *exampleT) finish() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}

// exampleGet prints the body of a GET of url, or the error.
func exampleGet(url string) {
	res, err := http.Get(url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	fmt.Println(res.Status, string(b))
}

// The TestMain of a package whose tests start modules (the modules are
// registered in init functions, as in the program):
//
//	func TestMain(m *testing.M) {
//		subproctest.Main(m)
//	}
//
// In the children, Main runs the module; in the test binary, it runs the
// tests, after making the children skip the race detector's exit sleep:
func ExampleMain() {
	fmt.Println(strings.Contains(os.Getenv("GORACE"), "atexit_sleep_ms="))
	// Output: true
}

// A test starts a module and sends it requests; the module is closed when
// the test ends.
func ExampleStart() {
	t := &exampleT{} // in a test: the test's *testing.T
	defer t.finish()

	h := subproctest.Start(t, "greeter", subproc.Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()

	exampleGet(srv.URL + "/hello")
	// Output: 200 OK hello from incarnation 0
}

// A test of what a crash of the module does: Kill returns once the new
// child serves.
func ExampleKill() {
	t := &exampleT{} // in a test: the test's *testing.T
	defer t.finish()

	h := subproctest.Start(t, "greeter", subproc.Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()

	exampleGet(srv.URL + "/hello")
	subproctest.Kill(t, h)
	exampleGet(srv.URL + "/hello")
	fmt.Println(h.Stats().LastExit)
	// Output:
	// 200 OK hello from incarnation 0
	// 200 OK hello from incarnation 1
	// signal: killed
}

// A test of what a hung module does: a frozen child answers nothing, and
// fails its health checks until it is thawed, or killed and replaced by
// the parent after Options.HealthFailures failed checks.
func ExampleFreeze() {
	t := &exampleT{} // in a test: the test's *testing.T
	defer t.finish()

	h := subproctest.Start(t, "greeter", subproc.Options{HealthTimeout: 100 * time.Millisecond})
	thaw := subproctest.Freeze(t, h)
	_, err := h.HealthCheck(context.Background())
	fmt.Println("frozen, the check fails:", err != nil)

	thaw()
	_, err = h.HealthCheck(context.Background())
	fmt.Println("thawed:", err)
	// Output:
	// frozen, the check fails: true
	// thawed: <nil>
}
