package subproc

// OnEvent callbacks that block or panic.

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

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
