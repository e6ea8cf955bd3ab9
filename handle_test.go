package subproc

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain is the helper-process pattern: in a child started by Start, Main
// runs the module and never returns.
func TestMain(m *testing.M) {
	Main()
	// A binary built with -race sleeps a second at exit by default; the
	// children are such binaries too, and would make every stop slow.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}
