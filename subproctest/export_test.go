package subproctest

import (
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
)

// Exported for the tests of package subproctest_test.

var WithRaceNoSleep = withRaceNoSleep

// CloseAndCheck is Start's cleanup for h, as if h had started process
// pid too, waiting wait for the children to be gone.
func CloseAndCheck(t testing.TB, h *subproc.Handle, pid int, wait time.Duration) {
	tr := &tracker{pids: map[int]bool{pid: true}, changed: make(chan struct{})}
	closeAndCheck(t, h, tr, wait)
}
