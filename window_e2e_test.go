package subproc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// End-to-end tests of the module-wide ceiling on buffered response bytes,
// with real children.

func init() {
	Register("win-stream", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		// GET /stream?bytes=N writes N bytes in chunks of chunkSize.
		mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
			n, err := strconv.Atoi(r.URL.Query().Get("bytes"))
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Length", strconv.Itoa(n))
			p := bytes.Repeat([]byte("w"), chunkSize)
			for sent := 0; sent < n; sent += len(p) {
				if _, err := w.Write(p[:min(len(p), n-sent)]); err != nil {
					return
				}
			}
		})
		return mux, nil
	})
}

// winStalledClient opens a connection with a tiny receive buffer, asks for
// an endless stream and reads nothing. Closing the connection ends it.
func winStalledClient(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return serr
	}}
	conn, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	fmt.Fprintf(conn, "GET /stream?bytes=%d HTTP/1.1\r\nHost: stalled\r\n\r\n", 1<<40)
	return conn
}

// Streams whose clients never read hold one chunk each in the parent, and
// never grow their windows; a fast stream beside them still completes; what
// the parent buffers for them all stays under the documented ceiling,
// flowBudgetSize + initialWindow per stream; and when the clients go away,
// everything they held is returned.
func TestWindowCeilingWithStalledClients(t *testing.T) {
	const stalled = 32
	h := startModule(t, "win-stream", Options{})
	srv := httptest.NewUnstartedServer(h)
	srv.Listener = smallBufListener{srv.Listener, 4096}
	srv.Start()
	defer srv.Close()
	b := &h.flow

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range stalled {
		conns = append(conns, winStalledClient(t, srv.Listener.Addr().String()))
	}
	// Each stalled stream's first chunk is stuck in the parent's write to
	// its client; the child has no credit for more.
	perStream := int64(frameCost(chunkSize))
	waitFor(t, 30*time.Second, "every stalled stream holds its first chunk", func() bool {
		return b.held.Load() >= stalled*perStream
	})
	require.LessOrEqual(t, b.held.Load(), stalled*perStream, "%d stalled streams hold more than a chunk (%d) each in the parent", stalled, perStream)
	r := b.reserved.Load()
	require.Zero(t, r, "stalled streams reserved %d bytes of window growth", r)

	// A fast stream beside them.
	const fastBytes = 64 << 20
	res, err := srv.Client().Get(srv.URL + "/stream?bytes=" + strconv.Itoa(fastBytes))
	require.NoError(t, err)
	n, err := io.Copy(io.Discard, res.Body)
	res.Body.Close()
	require.NoError(t, err, "fast stream beside %d stalled ones: %d bytes, %v; want %d", stalled, n, err, fastBytes)
	require.EqualValues(t, fastBytes, n, "fast stream beside %d stalled ones: %d bytes, %v; want %d", stalled, n, err, fastBytes)
	ceiling := int64(flowBudgetSize) + (stalled+1)*int64(initialWindow)
	p := b.peak.Load()
	require.LessOrEqual(t, p, ceiling, "the parent buffered up to %d bytes of responses, over the ceiling %d", p, ceiling)
	// The client has read the fast stream's last byte, but its exchange
	// in the parent may not have consumed the last frame yet.
	waitFor(t, 30*time.Second, "the fast stream to return what it held", func() bool {
		return b.held.Load() <= stalled*perStream
	})

	// The clients go away: the parent's writes to them fail, and their
	// streams return what they held.
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	waitFor(t, 30*time.Second, "the stalled streams return what they held", func() bool {
		return b.held.Load() == 0 && b.reserved.Load() == 0
	})
}
