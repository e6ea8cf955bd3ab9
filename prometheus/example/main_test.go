package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	subproc.Main()
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}

// TestRun serves the example, crashes a child and reads the crash and the
// restart at /metrics.
func TestRun(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, ln) }()
	defer func() {
		cancel()
		assert.NoError(t, <-done)
		http.DefaultClient.CloseIdleConnections()
	}()
	base := "http://" + ln.Addr().String()
	get := func(path string) (int, string) {
		t.Helper()
		res, err := http.Get(base + path)
		require.NoError(t, err)
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		return res.StatusCode, string(b)
	}

	status, body := get("/hello")
	assert.Equal(t, http.StatusOK, status, body)
	status, _ = get("/crash")
	assert.Equal(t, http.StatusBadGateway, status)
	// The exit's event reaches the Collector soon after the 502: poll.
	deadline := time.Now().Add(30 * time.Second)
	for {
		status, body = get("/metrics")
		require.Equal(t, http.StatusOK, status)
		if strings.Contains(body, `subproc_child_exits_total{module="hello",reason="crash"} 1`) &&
			strings.Contains(body, `subproc_children{module="hello",state="running"} 2`) {
			break
		}
		require.True(t, time.Now().Before(deadline), "no crash and restart at /metrics in 30s:\n%s", body)
		time.Sleep(20 * time.Millisecond)
	}
	assert.Contains(t, body, `subproc_request_failures_total{module="hello",outcome="bad_gateway"} 1`)
	assert.Contains(t, body, `subproc_requests_total{module="hello"} 1`)
	assert.Contains(t, body, "go_goroutines ")
}
