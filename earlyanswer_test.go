package subproc

// A module that answers before it has read its request's body, while the
// client still sends it: the parent stops sending the body, and neither
// the connection's next request nor the module's admission may pay for
// it.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("early", func(ctx context.Context, env *Env) (http.Handler, error) { return earlyMux(), nil })
}

// earlyMux is the module of this file, served both in a child and
// in-process.
func earlyMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/ignore", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ignored\n") })
	// Answers in part, without reading the body, and waits for the
	// request's end.
	mux.HandleFunc("/partial", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	// Answers in part, without reading the body, and aborts.
	mux.HandleFunc("/abort", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "partial\n")
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	// Reads the first 1000 bytes of the body and answers.
	mux.HandleFunc("/read1000", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.ReadFull(r.Body, make([]byte, 1000))
		fmt.Fprintf(w, "read %d %v\n", n, err)
	})
	return mux
}

// hideWriter is a middleware whose ResponseWriter wraps the server's
// without Unwrap, as many logging and metrics middlewares do: the parent
// cannot set the connection's deadlines through it.
func hideWriter(h http.Handler) http.Handler {
	type hidden struct{ http.ResponseWriter }
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { h.ServeHTTP(hidden{w}, r) })
}

// dialRaw opens a connection to srv, closed when the test ends, on which
// the test writes requests by hand; reads and writes fail after 20 s.
func dialRaw(t *testing.T, srv *httptest.Server) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	return conn
}

// readResponse reads a response from br and returns its status and body.
func readResponse(t *testing.T, br *bufio.Reader) (*http.Response, string) {
	t.Helper()
	res, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return res, res.Status + " " + string(b)
}

// The module answers a POST after 1000 bytes of its 2000, and the client
// sends the rest only then, then its next request: it gets the answer it
// gets in-process, and so does its next request, on the same connection
// or, where the answer says "Connection: close", on a new one. (The
// parent's stop of its read of the body made net/http cancel the
// connection's context, which the next request on it inherited: a 503.)
func TestEarlyAnswerNextRequest(t *testing.T) {
	h := startModule(t, "early", Options{})
	for _, tc := range []struct {
		name     string
		h        http.Handler
		answered func()
	}{
		{"in-process", earlyMux(), func() {}},
		{"subproc", h, func() {
			awaitStats(t, h, 15*time.Second, "the module's answer", func(st Stats) bool { return st.Requests >= 1 })
		}},
	} {
		srv := httptest.NewServer(tc.h)
		defer srv.Close()
		conn := dialRaw(t, srv)
		io.WriteString(conn, "POST /read1000 HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
		conn.Write(bytes.Repeat([]byte("b"), 1000))
		tc.answered()
		conn.Write(bytes.Repeat([]byte("b"), 1000))
		br := bufio.NewReader(conn)
		res, got := readResponse(t, br)
		assert.Equal(t, "200 OK read 1000 <nil>\n", got, tc.name)
		if res.Close {
			conn = dialRaw(t, srv)
			br = bufio.NewReader(conn)
		}
		io.WriteString(conn, "GET /ignore HTTP/1.1\r\nHost: x\r\n\r\n")
		_, got = readResponse(t, br)
		assert.Equal(t, "200 OK ignored\n", got, "%s: the next request", tc.name)
	}
}

// activeBody is a middleware's request body that says whether a Read is
// under way.
type activeBody struct {
	io.ReadCloser
	active atomic.Bool
}

func (b *activeBody) Read(p []byte) (int, error) {
	b.active.Store(true)
	defer b.active.Store(false)
	return b.ReadCloser.Read(p)
}

// Behind a middleware that hides net/http's ResponseWriter (and wraps the
// body), the parent cannot interrupt its read of a body whose client has
// stopped sending: once the module has answered, the module's only
// MaxInFlight place is free for the next client all the same, while its
// ServeHTTP waits for that read, as it may not return during one; the
// stalled client gets its answer once it sends the rest, which net/http
// then discards, as in-process.
func TestEarlyAnswerBehindWrapper(t *testing.T) {
	h := startModule(t, "early", Options{MaxInFlight: 1})
	readingAtReturn := make(chan bool, 1)
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/read1000" {
			h.ServeHTTP(w, r)
			return
		}
		body := &activeBody{ReadCloser: r.Body}
		r.Body = body
		hideWriter(h).ServeHTTP(w, r)
		readingAtReturn <- body.active.Load()
	}))
	conn := dialRaw(t, srv)
	io.WriteString(conn, "POST /read1000 HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n")
	conn.Write(bytes.Repeat([]byte("b"), 1000))
	// (Or answered already: if the module answered before the parent's
	// pump began its next read, nothing holds ServeHTTP.)
	awaitStats(t, h, 15*time.Second, "the request in flight", func(st Stats) bool { return st.InFlight == 1 || st.Requests == 1 })
	waitFor(t, 15*time.Second, "the next client to be served, not shed", func() bool {
		res, _, err := fetchErr(srv.URL+"/ignore", 5*time.Second)
		return err == nil && res.StatusCode == http.StatusOK
	})
	conn.Write(bytes.Repeat([]byte("b"), 3000)) // the rest, which net/http discards
	_, got := readResponse(t, bufio.NewReader(conn))
	assert.Equal(t, "200 OK read 1000 <nil>\n", got)
	assert.False(t, <-readingAtReturn, "ServeHTTP returned while it read the body")
}

// The same, but the module aborts its answer: the request's MaxInFlight
// place, given back once the module has answered, is not given back again
// as ServeHTTP returns. (The abort's panic went past ServeHTTP's record of
// the early release, and its deferred release gave the place back twice:
// each such request raised the limit by one, until the semaphore panicked.)
func TestEarlyAbortBehindWrapperFreesPlaceOnce(t *testing.T) {
	h := startModule(t, "early", Options{MaxInFlight: 2, HealthInterval: time.Hour})
	aborted := make(chan struct{})
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/abort" {
			defer close(aborted)
		}
		hideWriter(h).ServeHTTP(w, r)
	}))
	hold := dialRaw(t, srv) // one place, held until the test ends
	io.WriteString(hold, "GET /partial HTTP/1.1\r\nHost: x\r\n\r\n")
	awaitStats(t, h, 15*time.Second, "the held request in flight", func(st Stats) bool { return st.InFlight == 1 })
	conn := dialRaw(t, srv)
	io.WriteString(conn, "POST /abort HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n") // and none of the body
	awaitStats(t, h, 15*time.Second, "the abort", func(st Stats) bool { return st.Aborted == 1 })
	conn.Close() // the parent's read of the body ends
	select {
	case <-aborted:
	case <-time.After(15 * time.Second):
		t.Fatal("ServeHTTP of the aborted request has not returned")
	}
	require.True(t, h.admission.TryAcquire(1), "the aborted request's place is free")
	defer h.admission.Release(1)
	assert.False(t, h.admission.TryAcquire(1), "the held request's place is free too: MaxInFlight 2 admits 3")
}

// A child killed once it answered in part, without reading it, a request
// whose body the client still sends: the client sees the response cut, the
// parent stops reading the body, the request leaves the Handle, and the
// next child serves. (The body is of a known length, 1 MiB: net/http
// leaves it alone as the head goes out. A shorter or chunked one it would
// read there, to discard it, as in-process: the head would wait for the
// client to send it.)
func TestEarlyAnswerThenChildKilled(t *testing.T) {
	h := startModule(t, "early", Options{})
	srv := serve(t, h)
	pr, pw := io.Pipe()
	defer pw.Close()
	go pw.Write(make([]byte, 1000)) // the rest never comes
	req, err := http.NewRequest("POST", srv.URL+"/partial", pr)
	require.NoError(t, err)
	req.ContentLength = 1 << 20
	res, err := srv.Client().Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	br := bufio.NewReader(res.Body)
	line, err := br.ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "partial\n", line)
	pid := h.Stats().Pid
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	rest, err := io.ReadAll(br)
	assert.Error(t, err, "the response, cut by the child's death, read %q and ended", rest)
	waitFor(t, 20*time.Second, "the request to leave the Handle", func() bool { return h.Stats().InFlight == 0 })
	code, body := fetch(t, srv.URL+"/ignore")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ignored\n", body)
	assertReaped(t, pid)
}
