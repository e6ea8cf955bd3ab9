package subproc

// Clients that never read their responses may not hold the parent's
// goroutines, admission places or Shutdown for ever. Where transparency is
// in question, the same handler is served in-process by net/http beside
// subproc.

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("noread", func(ctx context.Context, env *Env) (http.Handler, error) { return noreadMux(), nil })
}

// noreadMux is the module of this file, served both in a child and
// in-process.
func noreadMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	// A handler that protects itself against a client that never reads,
	// as net/http lets it: with a write deadline.
	mux.HandleFunc("/deadline", func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		writeMiB(w, 64)
	})
	// The same, on a hijacked connection (a WebSocket server that drops a
	// client that does not read).
	mux.HandleFunc("/tunnel-deadline", func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotImplemented)
			return
		}
		defer conn.Close()
		io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
		conn.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		writeMiB(conn, 64)
	})
	// A 1xx head larger than the sockets' buffers, then no answer until
	// the request ends.
	mux.HandleFunc("/informational", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pad", strings.Repeat("x", 1<<20))
		w.WriteHeader(http.StatusEarlyHints)
		<-r.Context().Done()
	})
	// A 1xx head, then no answer until the request ends.
	mux.HandleFunc("/informational-late", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		<-r.Context().Done()
	})
	// A large response, with no deadline of its own.
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) { writeMiB(w, 64) })
	// A final head of 2 MiB, flushed, then no more until the request
	// ends.
	mux.HandleFunc("/large-head", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pad", strings.Repeat("x", largeHead))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	return mux
}

// largeHead is the size of /large-head's header field.
const largeHead = 2 << 20

// writeMiB writes n MiB to w, until a write fails.
func writeMiB(w io.Writer, n int) {
	buf := make([]byte, 64<<10)
	for range n * 16 {
		if _, err := w.Write(buf); err != nil {
			return
		}
	}
}

// A noreadTarget is one way of serving noreadMux: in-process or through
// subproc, counting the ServeHTTP calls under way.
type noreadTarget struct {
	name    string
	srv     *httptest.Server
	active  atomic.Int64 // ServeHTTP calls under way
	started atomic.Int64 // ServeHTTP calls begun
}

// noreadTargets serves noreadMux in-process and through h, in that order,
// on listeners with small send buffers.
func noreadTargets(t *testing.T, h http.Handler) []*noreadTarget {
	var ts []*noreadTarget
	for _, x := range []struct {
		name  string
		inner http.Handler
	}{{"in-process", noreadMux()}, {"subproc", h}} {
		tg := &noreadTarget{name: x.name}
		inner := x.inner
		tg.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tg.started.Add(1)
			tg.active.Add(1)
			defer tg.active.Add(-1)
			inner.ServeHTTP(w, r)
		}))
		tg.srv.Listener = smallBufListener{tg.srv.Listener, 4096}
		tg.srv.Start()
		t.Cleanup(tg.srv.Close)
		ts = append(ts, tg)
	}
	return ts
}

// dialNoRead sends a GET of path on a new connection to srv, with a small
// receive buffer, and never reads.
func dialNoRead(t *testing.T, srv *httptest.Server, path string) { dialNoReadConn(t, srv, path) }

// dialNoReadConn is dialNoRead, and returns the connection, which the
// test's cleanup closes.
func dialNoReadConn(t *testing.T, srv *httptest.Server, path string) net.Conn {
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	conn.(*net.TCPConn).SetReadBuffer(4096)
	t.Cleanup(func() { conn.Close() })
	_, err = io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	return conn
}

// A handler's write deadline frees it from a client that never reads, and
// in-process that ends the request. Through subproc the parent's
// ServeHTTP, blocked in its write to the client, ends too: else a few such
// clients would hold every MaxInFlight place, a goroutine and a socket
// each, for good. The same holds for a hijacked connection whose handler
// closes it.
func TestNoReadHandlerDeadlineEndsRequest(t *testing.T) {
	h := startModule(t, "noread", Options{MaxInFlight: 2})
	for _, path := range []string{"/deadline", "/tunnel-deadline"} {
		for _, tg := range noreadTargets(t, h) {
			dialNoRead(t, tg.srv, path)
			dialNoRead(t, tg.srv, path)
			waitFor(t, 10*time.Second, tg.name+" "+path+": both requests ended", func() bool {
				return tg.started.Load() == 2 && tg.active.Load() == 0
			})
			code, body := fetch(t, tg.srv.URL+"/ok")
			assert.Equal(t, http.StatusOK, code, "%s %s: %s", tg.name, path, body)
		}
	}
}

// A request's deadline (Options.RequestTimeout) ends it, though the parent
// is blocked writing its response to a client that reads nothing: the
// response is aborted, and counted as a timeout.
func TestNoReadRequestTimeout(t *testing.T) {
	h := startModule(t, "noread", Options{RequestTimeout: time.Second})
	srv := serve(t, h)
	dialNoRead(t, srv, "/big")
	awaitStats(t, h, 20*time.Second, "the request timed out and ended", func(st Stats) bool {
		return st.Timeouts == 1 && st.InFlight == 0
	})
}

// When Shutdown's context ends, the requests in flight are canceled: the
// parent's writes to clients that read nothing fail, those too whose
// response the child had ended, and Shutdown returns.
func TestNoReadShutdownCutShort(t *testing.T) {
	h, err := Start(context.Background(), "noread", testOptions(t, Options{}))
	require.NoError(t, err)
	pids := h.pidsStarted()
	tg := noreadTargets(t, h)[1]
	dialNoRead(t, tg.srv, "/big")
	waitFor(t, 10*time.Second, "the response to start", func() bool { return startedResponses(h) == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	err = h.Shutdown(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	waitFor(t, 10*time.Second, "the request's ServeHTTP to end", func() bool { return tg.active.Load() == 0 })
	assert.Equal(t, uint64(1), h.Stats().Aborted)
	for _, pid := range pids {
		assertReaped(t, pid)
	}
}

// startedResponses returns how many of the requests that h's first child
// serves have a response that the parent has started writing.
func startedResponses(h *Handle) int {
	return countRunning(h, func(s *stream) bool {
		s.cutMu.Lock()
		defer s.cutMu.Unlock()
		return s.cutW != nil
	})
}

// countRunning returns how many of the requests that h's first child
// serves satisfy cond, which is called with the child's lock held.
func countRunning(h *Handle, cond func(s *stream) bool) int {
	c := firstChild(h)
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for s := range c.running {
		if cond(s) {
			n++
		}
	}
	return n
}

// A child killed while the parent writes its response to a client that
// reads nothing: the write fails abortLinger later, and the response ends
// aborted, though the client never reads.
func TestNoReadChildKilled(t *testing.T) {
	h := startModule(t, "noread", Options{})
	tg := noreadTargets(t, h)[1]
	dialNoRead(t, tg.srv, "/big")
	waitFor(t, 10*time.Second, "the parent's write to the client to wait", stuckWriting(h))
	pid := firstChild(h).proc.Pid()
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	waitFor(t, 20*time.Second, "the request's ServeHTTP to end", func() bool { return tg.active.Load() == 0 })
	assert.Equal(t, uint64(1), h.Stats().Aborted)
}

// stuckWriting returns a condition for waitFor: the one request that h's
// first child serves waits in the parent's write to its client. The child
// has spent its credit, the request's goroutine holds a chunk it has not
// written, and nothing has moved for 40 polls (200 ms): the goroutine is
// not between two writes, nor in one that the kernel's buffers still
// take, but in one that waits for the client.
func stuckWriting(h *Handle) func() bool {
	last := int64(-1)
	return stillFor(h, func(s *stream) bool {
		r := s.recv
		moved := r.received != last
		last = r.received
		return r.received == r.granted && r.held > 0 && len(s.events) == 0 && !moved
	})
}

// stillFor returns a condition for waitFor: cond, called with the stream's
// lock held, holds for the one request that h's first child serves at 40
// polls in a row (200 ms).
func stillFor(h *Handle, cond func(s *stream) bool) func() bool {
	still := 0
	return func() bool {
		c := firstChild(h)
		c.mu.Lock()
		defer c.mu.Unlock()
		for s := range c.running {
			s.mu.Lock()
			defer s.mu.Unlock()
			if cond(s) {
				still++
			} else {
				still = 0
			}
			return still >= 40
		}
		return false
	}
}

// A 1xx head waits in the parent's write to a client that reads nothing,
// as a response's body does: the request's deadline ends it (counted as a
// timeout), and so does the death of the child, which had not answered
// (a 502 that the client never reads).
func TestNoReadInformational(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		h := startModule(t, "noread", Options{RequestTimeout: time.Second})
		tg := noreadTargets(t, h)[1]
		dialNoRead(t, tg.srv, "/informational")
		waitFor(t, 20*time.Second, "the request's ServeHTTP to end", func() bool {
			return tg.started.Load() == 1 && tg.active.Load() == 0
		})
		assert.Equal(t, uint64(1), h.Stats().Timeouts)
	})
	t.Run("child killed", func(t *testing.T) {
		h := startModule(t, "noread", Options{})
		tg := noreadTargets(t, h)[1]
		dialNoRead(t, tg.srv, "/informational")
		waitFor(t, 10*time.Second, "the parent's write of the 1xx head to wait", stuckInformational(h))
		require.NoError(t, syscall.Kill(firstChild(h).proc.Pid(), syscall.SIGKILL))
		waitFor(t, 20*time.Second, "the request's ServeHTTP to end", func() bool { return tg.active.Load() == 0 })
		assert.Equal(t, uint64(1), h.Stats().BadGateway)
	})
}

// A client that reads gets the 1xx head and then the 504 of the request's
// deadline, as through httputil.ReverseProxy, over HTTP/1 and HTTP/2: the
// cut of the parent's writes at the deadline, armed by the 1xx head,
// leaves the 504 time to reach the client (a write deadline in the past
// would fail it, and make net/http's HTTP/2 server reset the stream).
func TestInformationalThenTimeout(t *testing.T) {
	h := startModule(t, "noread", Options{RequestTimeout: 500 * time.Millisecond})
	for _, http2 := range []bool{false, true} {
		srv := httptest.NewUnstartedServer(h)
		srv.EnableHTTP2 = http2
		srv.StartTLS()
		defer srv.Close()
		var got []int
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, _ textproto.MIMEHeader) error {
			got = append(got, code)
			return nil
		}}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), "GET", srv.URL+"/informational-late", nil)
		require.NoError(t, err)
		resp, err := srv.Client().Do(req)
		require.NoError(t, err, "HTTP/2 %v", http2)
		defer resp.Body.Close()
		assert.Equal(t, map[bool]int{false: 1, true: 2}[http2], resp.ProtoMajor)
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		assert.Equal(t, []int{http.StatusEarlyHints}, got)
		assert.Equal(t, http.StatusGatewayTimeout, resp.StatusCode, "%s", body)
		assert.Contains(t, string(body), `module "noread"`)
	}
}

// stuckInformational returns a condition for waitFor: the one request
// that h's first child serves has had its 1xx head taken by the request's
// goroutine, and nothing more for 40 polls (200 ms). The head is larger
// than the sockets' buffers (see noreadTargets): its write waits for the
// client.
func stuckInformational(h *Handle) func() bool {
	return stillFor(h, func(s *stream) bool { return s.informal == 1 && len(s.events) == 0 })
}

// The heads a module's responses hold in the parent for clients that read
// nothing have a ceiling for the module as a whole, not only per request
// (see headBudgetSize): the heads past it fail their requests with 502
// (which those clients never read either), and those held are returned to
// the budget as their requests end.
func TestNoReadLargeHeadsBounded(t *testing.T) {
	const path = "/large-head"
	h := startModule(t, "noread", Options{})
	tg := noreadTargets(t, h)[1]
	const clients = 20                 // 40 MiB of heads
	fits := headBudgetSize / largeHead // at most: each costs a little more
	before := heapAfterGC()
	var conns []net.Conn
	for i := range clients {
		conns = append(conns, dialNoReadConn(t, tg.srv, path))
		waitFor(t, 10*time.Second, "the request to be held or refused", func() bool {
			return chargedHeads(h)+int(h.Stats().BadGateway) == i+1
		})
	}
	held := chargedHeads(h)
	assert.Positive(t, held)
	assert.LessOrEqual(t, held, fits)
	assert.Equal(t, uint64(clients-held), h.Stats().BadGateway, "the heads past the budget get 502")
	waitFor(t, 10*time.Second, "the refused requests to end", func() bool { return tg.active.Load() == int64(held) })
	assert.LessOrEqual(t, h.heads.reserved.Load(), int64(headBudgetSize))
	grown := int64(heapAfterGC()) - int64(before)
	assert.Less(t, grown, int64(headBudgetSize+8<<20), "the parent's heap grew by %d MiB", grown>>20)

	for _, c := range conns {
		c.Close()
	}
	waitFor(t, 20*time.Second, "the held requests to end", func() bool { return tg.active.Load() == 0 })
	assert.Zero(t, h.heads.reserved.Load(), "what the requests reserved is returned")
	res, err := tg.srv.Client().Get(tg.srv.URL + path)
	require.NoError(t, err)
	defer res.Body.Close()
	assert.Equal(t, http.StatusOK, res.StatusCode, "a client that reads gets its large head")
	assert.Len(t, res.Header.Get("X-Pad"), largeHead)
}

// chargedHeads returns how many of the requests that h's first child
// serves hold a charge to the head budget.
func chargedHeads(h *Handle) int {
	return countRunning(h, func(s *stream) bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.headsHeld > 0
	})
}

// heapAfterGC returns the bytes of the process's live heap.
func heapAfterGC() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// The heads held for clients that read nothing are returned to the budget
// when their child is killed, too: the writes are cut abortLinger later,
// the requests end aborted, and the replacement's large heads fit again.
func TestNoReadLargeHeadsChildKilled(t *testing.T) {
	h := startModule(t, "noread", Options{})
	tg := noreadTargets(t, h)[1]
	for i := range 3 {
		dialNoReadConn(t, tg.srv, "/large-head")
		waitFor(t, 10*time.Second, "the head to be held", func() bool { return chargedHeads(h) == i+1 })
	}
	require.Positive(t, h.heads.reserved.Load())
	inc := h.Stats().Incarnation
	require.NoError(t, syscall.Kill(firstChild(h).proc.Pid(), syscall.SIGKILL))
	waitFor(t, 20*time.Second, "the held requests to end", func() bool { return tg.active.Load() == 0 })
	assert.Zero(t, h.heads.reserved.Load(), "what the requests reserved is returned")
	assert.Equal(t, uint64(3), h.Stats().Aborted)
	awaitStats(t, h, 20*time.Second, "the replacement", runningInc(inc+1))
	res, err := tg.srv.Client().Get(tg.srv.URL + "/large-head")
	require.NoError(t, err)
	defer res.Body.Close()
	assert.Equal(t, http.StatusOK, res.StatusCode)
}
