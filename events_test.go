package subproc

// OnEvent callbacks that block or panic.

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A pool whose third child fails to start: Start fails, and stops the
// two children that had started. OnEvent saw them start; it sees them
// end. (It did not.)
func TestOnEventStartFailureEndsStartedChildren(t *testing.T) {
	var events eventLog
	_, err := Start(context.Background(), "pool-mod", testOptions(t, withConfig(t, poolConfig{First: 2, RestartInitFail: true}, Options{
		Children: 3, HealthInterval: time.Hour, OnEvent: events.add,
	})))
	var se *StartError
	require.ErrorAs(t, err, &se)
	require.Equal(t, 2, events.count(ChildStarted, ""), "events: %v", events.kinds())
	assert.Equal(t, 2, events.count(ChildExited, "shutdown"), "events: %v", events.kinds())
}

// An OnEvent callback that blocks does not keep Shutdown past its
// context.
func TestOnEventBlockingDoesNotHoldShutdown(t *testing.T) {
	release := make(chan struct{})
	h, err := Start(context.Background(), "noread", testOptions(t, Options{
		OnEvent: func(Event) { <-release },
	}))
	require.NoError(t, err)
	defer close(release) // the callback's goroutine ends
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- h.Shutdown(ctx) }()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, "stopped", h.Stats().State)
	case <-time.After(20 * time.Second):
		t.Fatalf("Shutdown, with a context of 500ms, waits for an OnEvent that blocks; %+v", h.Stats())
	}
}

// A panic in OnEvent is logged, and the next event is delivered: it runs
// on the Handle's goroutine, where its author cannot recover it.
func TestOnEventPanicIsLogged(t *testing.T) {
	logs := newLogSink()
	var calls atomic.Int64
	h, err := Start(context.Background(), "noread", testOptions(t, Options{
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
		OnEvent: func(ev Event) {
			calls.Add(1)
			panic("careless OnEvent")
		},
	}))
	require.NoError(t, err)
	require.NoError(t, h.Close())
	assert.GreaterOrEqual(t, calls.Load(), int64(2), "ChildStarted and ChildExited")
	assert.Contains(t, logs.String(), "Options.OnEvent panicked on a ChildStarted event: careless OnEvent")
	assert.True(t, strings.Count(logs.String(), "Options.OnEvent panicked") >= 2, "every panic is logged:\n%s", logs)
}

// The events that wait for a slow OnEvent hold at most maxQueuedOutput
// bytes of Output: beyond it, they come in order all the same, each with
// one line for its Output that says how much was dropped. (Children that
// exit quickly, with long last lines, made a blocked callback cost the
// parent megabytes per exit.)
func TestOnEventQueueBoundsOutput(t *testing.T) {
	blocked, release := make(chan struct{}), make(chan struct{})
	var got []Event
	q := newEventQueue(func(ev Event) {
		if ev.Reason == "first" {
			close(blocked)
			<-release
		}
		got = append(got, ev)
	}, t.Logf)
	q.post(Event{Reason: "first"})
	<-blocked
	line := strings.Repeat("x", 64<<10)
	const n = 200 // 20 lines each: 250 MiB, were they all kept
	for i := range n {
		q.post(Event{Reason: strconv.Itoa(i), Output: slices.Repeat([]string{line}, 20)})
	}
	q.mu.Lock()
	queued := q.output
	q.mu.Unlock()
	assert.LessOrEqual(t, queued, maxQueuedOutput, "bytes of Output queued")
	close(release)
	q.close()
	require.Len(t, got, n+1)
	kept := 0
	for i, ev := range got[1:] {
		require.Equal(t, strconv.Itoa(i), ev.Reason, "events in order")
		if len(ev.Output) == 20 {
			kept++
		} else {
			assert.Equal(t, []string{fmt.Sprintf("[%d bytes of output dropped: Options.OnEvent is too slow]", 20*len(line))}, ev.Output)
		}
	}
	assert.Equal(t, maxQueuedOutput/(20*len(line)), kept, "events with their Output")
}

// An OnEvent callback that shuts its handle down (Close on a crash) gets
// a graceful stop.
// (Shutdown waited for the callback to return: Close ran into its
// ShutdownTimeout and killed the children, Shutdown(context.Background())
// never returned.)
func TestOnEventCanShutDown(t *testing.T) {
	var hp atomic.Pointer[Handle]
	var events eventLog
	closed := make(chan error, 1)
	h, err := Start(context.Background(), "fail-mod", testOptions(t, Options{
		ShutdownTimeout: 5 * time.Second,
		OnEvent: func(ev Event) {
			events.add(ev)
			if ev.Kind == ChildExited && ev.Reason == "crash" {
				closed <- hp.Load().Close()
			}
		},
	}))
	require.NoError(t, err)
	hp.Store(h)
	pid := h.Stats().Pid
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	select {
	case err := <-closed:
		require.NoError(t, err, "Close from OnEvent")
	case <-time.After(30 * time.Second):
		t.Fatalf("Close called from OnEvent has not returned; %+v", h.Stats())
	}
	require.NoError(t, h.Shutdown(context.Background()), "Shutdown waits for the callback's return")
	assert.Equal(t, "stopped", h.Stats().State)
	assertReaped(t, pid)
	for _, c := range h.Stats().Children {
		assertReaped(t, c.Pid)
	}
	assert.Equal(t, 1, events.count(ChildExited, "crash"), "events: %v", events.kinds())
}
