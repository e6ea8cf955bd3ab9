package subproc

// Regression tests of bugs found by review, each failing without its fix.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("regress", func(ctx context.Context, env *Env) (http.Handler, error) { return regressMux(), nil })
}

// regressMux is the module of this file.
func regressMux() http.Handler {
	mux := http.NewServeMux()
	// Does some work first, then looks at the declared trailers, as
	// net/http's doc allows before the body is read, then reads the
	// body and answers with the trailer's value.
	mux.HandleFunc("/trailer", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond) // the module's work, not a synchronization
		declared := len(r.Trailer)
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "declared %d, X-T=%q\n", declared, r.Trailer.Get("X-T"))
	})
	return mux
}

// The old child dies while its replacement starts, and its teardown takes
// a while (a process it started holds its stderr): the dead child's
// ChildExited and ModuleDegraded come first, then the replacement's
// ChildStarted, as after a restart, though the replacement became ready
// during the teardown.
func TestCrashDuringReplacementEventOrder(t *testing.T) {
	replacementReady := make(chan struct{})
	stderrHeld := make(chan struct{})
	defer close(stderrHeld)
	var events eventLog
	f := &fakeChildren{behave: func(slot, inc int) fakeBehaviour {
		switch inc {
		case 0:
			return fakeBehaviour{holdStderr: stderrHeld}
		case 1:
			return fakeBehaviour{readyAt: replacementReady}
		}
		return fakeBehaviour{}
	}}
	h, err := startFake(t, f, Options{OnEvent: events.add})
	require.NoError(t, err)
	old := firstChild(h)
	restarted := make(chan error, 1)
	go func() { restarted <- h.Restart(context.Background()) }()
	waitFor(t, 10*time.Second, "the replacement to start", func() bool { return len(f.startsOf()) == 2 })
	old.proc.Kill()
	waitFor(t, 10*time.Second, "the dead child to leave its slot", func() bool { return !h.Ready() })
	close(replacementReady)
	select {
	case err := <-restarted:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("Restart did not return")
	}
	waitFor(t, 10*time.Second, "five events", func() bool { return len(events.kinds()) >= 5 })
	assert.Equal(t, []string{"ChildStarted ", "ChildRecycling restart", "ChildExited crash", "ModuleDegraded crash", "ChildStarted restart"}, events.kinds())
	events.mu.Lock()
	l := append([]Event(nil), events.events...)
	events.mu.Unlock()
	t.Logf("ChildStarted(restart) to the last event: %v", l[len(l)-1].Time.Sub(l[2].Time))
}

func init() {
	// A ModuleFunc that takes a while (it loads something, say) and
	// little memory.
	Register("regress-slowinit", func(ctx context.Context, env *Env) (http.Handler, error) {
		select {
		case <-time.After(1500 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return http.NotFoundHandler(), nil
	})
}

// MemoryMax while a child starts counts what it allocated, not the pages of
// its binary that its package initialisation touched, which it drops once
// ready: a child whose ModuleFunc outlives HealthInterval starts, and runs,
// under a MemoryMax a little above what it uses running.
func TestLimitsMemoryWhileStartingIgnoresBinaryPages(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("memory limits read /proc")
	}
	h, err := Start(context.Background(), "regress-slowinit", testOptions(t, Options{}))
	require.NoError(t, err)
	c := firstChild(h)
	var running int64
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) { // the highest it reads, once its pages were dropped
		time.Sleep(100 * time.Millisecond)
		running = max(running, c.proc.Memory())
	}
	require.NoError(t, h.Close())
	limit := running + 3<<20
	t.Logf("running: %d KiB; MemoryMax: %d KiB", running>>10, limit>>10)
	h, err = Start(context.Background(), "regress-slowinit", testOptions(t, Options{MemoryMax: limit, HealthInterval: 100 * time.Millisecond, StartTimeout: time.Minute}))
	require.NoError(t, err, "a child that runs %d KiB under MemoryMax", (limit-running)>>10)
	defer h.Close()
	awaitStats(t, h, 10*time.Second, "a check of the running child", func(st Stats) bool {
		return len(st.Children) == 1 && st.Children[0].Memory > 0
	})
	assert.Less(t, h.Stats().Children[0].Memory, limit)
}

// syncBuffer is an Options.Stderr that keeps what the child wrote.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// A request's trailers are merged into r.Trailer by the handler's read
// that reaches EOF, as in net/http: a handler that looks at r.Trailer
// before it reads its body sees none (none were declared), and races with
// nothing. Under -race, the child's race detector would say so on its
// stderr.
func TestRequestTrailersMergedAtEOF(t *testing.T) {
	if !raceEnabled {
		t.Skip("needs -race")
	}
	var stderr syncBuffer
	h := startModule(t, "regress", Options{Stderr: &stderr})
	srv := serve(t, h)
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(conn, "POST /trailer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: v\r\n\r\n")
	_, got := readResponse(t, bufio.NewReader(conn))
	assert.Equal(t, "200 OK declared 0, X-T=\"v\"\n", got)
	require.NoError(t, h.Close())
	assert.NotContains(t, stderr.String(), "DATA RACE")
}
