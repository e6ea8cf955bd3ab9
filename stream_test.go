package subproc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/require"
)

// fakeProcess stands in for a child process in tests that run both sides of
// the protocol in one process.
type fakeProcess struct {
	exited chan struct{}
	once   sync.Once
}

func (p *fakeProcess) Pid() int          { return 1 }
func (p *fakeProcess) Wait() error       { <-p.exited; return nil }
func (p *fakeProcess) Kill()             { p.once.Do(func() { close(p.exited) }) }
func (p *fakeProcess) Quit() bool        { return false }
func (p *fakeProcess) Memory() int64     { return 0 }
func (p *fakeProcess) AnonMemory() int64 { return 0 }

// pipePair is a parent's child and a child's server joined by in-memory
// pipes.
type pipePair struct {
	c    *child
	srv  *server
	kill func() // ends both pipes, as the child's death does
	end  func() // cancels the server's context, as a child does when its reads from the parent fail
}

// newPipePair connects a parent-side child to a server running handler, over
// io.Pipes, and tears both down when the test ends.
func newPipePair(t *testing.T, handler http.Handler) *pipePair {
	t.Helper()
	return newPipePairFlow(t, handler, 0, nil)
}

// newPipePairFlow is newPipePair with the given flowBudget limit and clock
// (zero and nil for the defaults) on both sides.
func newPipePairFlow(t *testing.T, handler http.Handler, limit int64, now func() time.Time) *pipePair {
	t.Helper()
	p2cR, p2cW := io.Pipe()
	c2pR, c2pW := io.Pipe()
	h := &Handle{name: "pipe", opts: Options{Logger: discardLogger()}.withDefaults()}
	h.flow.limit, h.flow.now = limit, now
	accept := newLocalWord()
	c := newChild(h, 0, &fakeProcess{exited: make(chan struct{})}, newConn(c2pR, p2cW), accept)
	ctx, cancel := context.WithCancel(context.Background())
	srv := newServer(ctx, nil, newConn(p2cR, c2pW), accept, handler)
	srv.flow.limit, srv.flow.now = limit, now
	// The chunks of 16 KiB and more go through rings, as with a real
	// child, while they have free slots.
	rings := newLocalRings()
	c.ring, srv.sendRing = rings.up, rings.up
	c.sendRing, srv.recvRing = rings.down, rings.down
	srvDone := make(chan error, 1)
	go c.writeLoop()
	go srv.writeLoop()
	go func() {
		if err := frame.ReadPreamble(srv.fr.Buffered(), protocolVersion); err != nil {
			srvDone <- err
			return
		}
		srv.send(outFrame{kind: kindReady, msg: &ready{Pid: 1}}, nil)
		srvDone <- srv.readLoop()
	}()
	go c.readLoop()
	require.NoError(t, <-c.ready, "handshake")
	t.Cleanup(func() {
		cancel()
		c.stopWriting()
		<-c.wdone // closes p2cW: the server's readLoop sees EOF
		<-srvDone
		srv.active.Wait()
		c.proc.Kill() // the fake child exits
		srv.stopWriting()
		<-srv.wdone // closes c2pW: the parent's readLoop sees EOF
		<-c.done
	})
	kill := func() {
		c2pW.CloseWithError(io.ErrUnexpectedEOF)
		p2cR.CloseWithError(io.ErrClosedPipe)
	}
	return &pipePair{c: c, srv: srv, kill: kill, end: cancel}
}

// waitFull waits until a queue, whose cost queued reports and whose changes
// wake signals, leaves no room within limit for a frame of nextCost, or
// fails the test. It also fails if the queue ever exceeds limit. Nobody
// else may consume wake meanwhile.
func waitFull(t *testing.T, what string, queued func() int, wake <-chan struct{}, limit, nextCost int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		q := queued()
		require.LessOrEqual(t, q, limit, "%s costs %d, more than %d", what, q, limit)
		if q+nextCost > limit {
			return
		}
		select {
		case <-wake:
		case <-deadline:
			t.Fatalf("%s costs %d; the window (%d) is not full", what, q, limit)
		}
	}
}

// queuedOf reports a parent stream's queued cost.
func queuedOf(s *stream) func() int {
	return func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.queued
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// readAll consumes a stream as proxy does and returns the body.
func readAll(t *testing.T, c *child, s *stream) (status int, body []byte) {
	t.Helper()
	for {
		ev, err := s.next(nil)
		require.NoError(t, err, "stream %d", s.id)
		switch ev.kind {
		case kindResponse:
			status = ev.head.Status
		case kindData:
			body = append(body, ev.data()...)
			ev.release()
			if n := s.consume(ev.n); n > 0 {
				c.sendWindowUpdate(s.id, n, nil)
			}
		case kindEnd:
			return status, body
		case kindAbort:
			t.Fatalf("stream %d aborted", s.id)
		}
	}
}

func openRequest(t *testing.T, c *child, r *http.Request) *stream {
	t.Helper()
	s, err := c.open(r, newRequestHead(r))
	require.NoError(t, err)
	return s
}

// A handler that returns at its context's end, which the child cancels when
// it ends without the parent having canceled the request, aborts its
// response: an end would make the part it wrote look whole to the client.
// So does a handler that returns after a write failed.
func TestHandlerCutByChildEndAborts(t *testing.T) {
	for _, write := range []bool{false, true} {
		t.Run(fmt.Sprintf("write after the end %v", write), func(t *testing.T) {
			wrote := make(chan struct{})
			werr := make(chan error, 1)
			pp := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "part")
				w.(http.Flusher).Flush()
				close(wrote)
				<-r.Context().Done()
				if write {
					_, err := io.WriteString(w, "rest")
					werr <- err
				}
			}))
			s := openRequest(t, pp.c, httptest.NewRequest("GET", "/", nil))
			<-wrote
			pp.end()
			var kinds []uint8
			var body []byte
			for {
				ev, err := s.next(nil)
				require.NoError(t, err)
				kinds = append(kinds, ev.kind)
				if ev.kind == kindData {
					body = append(body, ev.data()...)
				}
				ev.release()
				if ev.kind == kindEnd || ev.kind == kindAbort {
					break
				}
			}
			require.Equal(t, []uint8{kindResponse, kindData, kindAbort}, kinds, "what the parent got")
			require.Equal(t, "part", string(body))
			if write {
				require.Error(t, <-werr, "a write after the context's end")
			}
		})
	}
}

// A handler that returns with its last chunk waiting for credit, which
// the parent does not return, and a write deadline that passes during
// that wait, aborts its response: the end would make it look whole
// without that chunk. In-process, net/http would cut the connection.
func TestFinishCutByWriteDeadlineAborts(t *testing.T) {
	pp := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		w.Write(make([]byte, chunkSize)) // buffered
		w.Write(make([]byte, chunkSize)) // sends the first, which takes the initial window
	}))
	s := openRequest(t, pp.c, httptest.NewRequest("GET", "/", nil))
	var kinds []uint8
	n := 0
	for {
		ev, err := s.next(nil) // no credit goes back
		require.NoError(t, err)
		kinds = append(kinds, ev.kind)
		n += ev.n
		ev.release()
		if ev.kind == kindEnd || ev.kind == kindAbort {
			break
		}
	}
	require.Equal(t, []uint8{kindResponse, kindData, kindAbort}, kinds, "what the parent got")
	require.Equal(t, chunkSize, n, "body bytes")
}

// A response nobody reads stalls its handler after its initial window of
// bytes (its window never grows), and other requests on the same pipe go on.
func TestResponseFlowControlBoundsBuffering(t *testing.T) {
	const total = 4 << 20
	var written atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		p := bytes.Repeat([]byte("x"), 4096)
		for written.Load() < total {
			n, err := w.Write(p)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "small") })
	pp := newPipePair(t, mux)

	big := openRequest(t, pp.c, httptest.NewRequest("GET", "/big", nil))
	// Take the head, then read nothing: the child may send a window.
	ev, err := big.next(nil)
	require.NoError(t, err, "first event: %+v", ev)
	require.Equal(t, kindResponse, ev.kind, "first event: %+v", ev)
	waitFull(t, "parent's queue", queuedOf(big), big.wake, frameCost(chunkSize), frameCost(1))

	small := openRequest(t, pp.c, httptest.NewRequest("GET", "/small", nil))
	st, body := readAll(t, pp.c, small)
	require.EqualValues(t, 200, st, "small request: %d %q", st, body)
	require.Equal(t, "small", string(body), "small request: %d %q", st, body)
	// The handler is stalled: it wrote at most the initial window plus what
	// its buffer and one Write hold.
	w := written.Load()
	require.LessOrEqual(t, w, int64(chunkSize+chunkSize+4096), "handler wrote %d bytes with nothing read; the initial window is %d", w, initialWindow)
	q := queuedOf(big)()
	require.Equal(t, frameCost(chunkSize), q, "parent's queue for the stalled response costs %d; want one chunk (%d)", q, frameCost(chunkSize))
	r := pp.c.flow.reserved.Load()
	require.Zero(t, r, "the stalled response reserved %d bytes of window growth", r)

	_, rest := readAll(t, pp.c, big)
	got := len(rest)
	require.Equal(t, total, got, "big response: %d bytes, want %d", got, total)
}

// A request body the handler does not read stalls the parent's sender after
// its initial window of bytes, and other requests go on.
func TestRequestFlowControlBoundsBuffering(t *testing.T) {
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		<-release
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n)
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "small") })
	pp := newPipePair(t, mux)
	unblock := sync.OnceFunc(func() { close(release) })
	t.Cleanup(unblock) // before the pair's: a failed test must not leave the handler blocked

	const total = 2 << 20
	var read atomic.Int64
	req := httptest.NewRequest("POST", "/upload", countingReader{strings.NewReader(strings.Repeat("y", total)), &read})
	req.ContentLength = total
	s := openRequest(t, pp.c, req)
	rec := httptest.NewRecorder()
	body := startBody(pp.c, s, req, rec, http.NewResponseController(rec), nil)
	defer body.halt()

	// The child receives a window of body and no more: its handler reads
	// nothing yet.
	var received *bodyReader
	deadline := time.After(10 * time.Second)
	for received == nil {
		if st := pp.srv.stream(s.id); st != nil {
			received = st.body
			break
		}
		select {
		case <-deadline:
			t.Fatal("the child never opened the request")
		case <-time.After(time.Millisecond): // the stream map has no event to wait on
		}
	}
	waitFull(t, "child's queue", func() int {
		received.mu.Lock()
		defer received.mu.Unlock()
		return received.queued
	}, received.wake, frameCost(chunkSize), frameCost(1))
	require.LessOrEqual(t, read.Load(), int64(chunkSize), "parent read more of the client's body than the initial window of %d lets it", initialWindow)
	require.Zero(t, pp.srv.flow.reserved.Load(), "the stalled body reserved bytes of window growth")

	small := openRequest(t, pp.c, httptest.NewRequest("GET", "/small", nil))
	st, b := readAll(t, pp.c, small)
	require.Equal(t, http.StatusOK, st, "small request: %q", b)
	require.Equal(t, "small", string(b), "small request")
	unblock()
	st, b = readAll(t, pp.c, s)
	require.Equal(t, http.StatusOK, st, "upload: %q", b)
	require.Equal(t, fmt.Sprint(total), string(b), "upload")
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// A response that starts small and grows moves from a small buffer to a
// chunk without losing or reordering bytes.
func TestResponseGrowsPastSmallBuffer(t *testing.T) {
	want := make([]byte, 0, 3*chunkSize)
	for i := 0; i < smallChunk+100; i++ {
		want = append(want, byte('a'+i%26))
	}
	tail := bytes.Repeat([]byte("0123456789"), 2*chunkSize/10)
	want = append(want, tail...)
	pp := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i < smallChunk+100; i++ {
			w.Write(want[i : i+1])
		}
		w.Write(tail)
	}))
	s := openRequest(t, pp.c, httptest.NewRequest("GET", "/", nil))
	st, b := readAll(t, pp.c, s)
	require.EqualValues(t, 200, st, "got %d, %d bytes; want 200, %d bytes", st, len(b), len(want))
	require.Equal(t, b, want, "got %d, %d bytes; want 200, %d bytes", st, len(b), len(want))
}

// The worker that reads a request without a body serves it holding the
// reading turn (see server.lend): a handler that then blocks on something
// other than the parent must not keep the child from reading. Here the
// first request's handler blocks until the test ends; the second request,
// and a third after it, are served meanwhile, as is a ping.
func TestLentTurnDoesNotStallReading(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/block", func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release // not the request's context: the parent sends nothing
	})
	mux.HandleFunc("/fast", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "fast") })
	pp := newPipePair(t, mux)
	defer close(release)

	block := openRequest(t, pp.c, httptest.NewRequest("GET", "/block", nil))
	<-entered
	for i := range 2 {
		fast := openRequest(t, pp.c, httptest.NewRequest("GET", "/fast", nil))
		done := make(chan struct{})
		var st int
		var body []byte
		go func() {
			defer close(done)
			st, body = readAll(t, pp.c, fast)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			pp.kill() // so that the cleanup can end
			t.Fatalf("request %d: no answer in 10 s while another handler blocks: the child stopped reading", i+2)
		}
		require.Equal(t, http.StatusOK, st)
		require.Equal(t, "fast", string(body))
	}
	timeout := make(chan struct{})
	timer := time.AfterFunc(10*time.Second, func() { close(timeout) })
	defer timer.Stop()
	_, err := pp.c.ping(timeout)
	require.NoError(t, err, "ping while a handler blocks")
	pp.c.forget(block, false, time.Now())
}

// The worker that reads a request without a body keeps the reading turn
// while it serves it (see server.lend): no other worker reads meanwhile.
// A request with a body hands the reading on at once, as its handler needs
// the body's frames. The loan's time limit is raised so that a slow
// machine cannot end it first.
func TestBodylessRequestKeepsReadingTurn(t *testing.T) {
	var srv *server
	lent := make(chan bool, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		srv.lendMu.Lock()
		lent <- srv.lent != nil
		srv.lendMu.Unlock()
		io.Copy(io.Discard, r.Body)
	})
	pp := newPipePair(t, h)
	srv = pp.srv
	srv.lendFor = time.Hour // before any request: the pipe orders it before lend reads it
	for i, tc := range []struct {
		body string
		lent bool
	}{{"", true}, {"", true}, {"some body", false}, {"", true}} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		s := openRequest(t, pp.c, httptest.NewRequest("POST", "/", body))
		if tc.body != "" {
			require.NoError(t, pp.c.send(outFrame{kind: kindData, id: s.id, data: []byte(tc.body)}, nil))
			require.NoError(t, pp.c.send(outFrame{kind: kindEnd, id: s.id}, nil))
		}
		require.Equal(t, tc.lent, <-lent, "request %d (body %q): reading turn lent to its worker", i+1, tc.body)
		st, _ := readAll(t, pp.c, s)
		require.Equal(t, http.StatusOK, st)
	}
}

// At its head, a handler of an HTTP/1 request that has not read its body
// to its end loses the rest, as net/http discards it in-process: what the
// parent sends later is not read, though the parent sent it before it got
// the head. Unless 256 KiB or more of a body of known length is left, or
// the header says "Connection: close": then the handler reads on, and the
// head tells the parent to close the connection after the response.
func TestBodyAtHead(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int64
		conn string
		keep bool
	}{
		{"discarded", 100 << 10, "", false},
		{"chunked, discarded", -1, "", false},
		{"too much left", 1 << 20, "", true},
		{"Connection: close", 100 << 10, "close", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			flushed, sent := make(chan struct{}), make(chan struct{})
			release := sync.OnceFunc(func() { close(sent) })
			got := make(chan error, 1)
			pp := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.ReadFull(r.Body, make([]byte, 1024))
				if tc.conn != "" {
					w.Header().Set("Connection", tc.conn)
				}
				w.(http.Flusher).Flush()
				close(flushed)
				<-sent
				_, err := io.ReadFull(r.Body, make([]byte, 1024))
				got <- err
			}))
			r := httptest.NewRequest("POST", "/", strings.NewReader("x"))
			r.ContentLength = tc.n
			s := openRequest(t, pp.c, r)
			t.Cleanup(func() { // before the pipes', if the test fails: the handler returns
				release()
				pp.c.send(outFrame{kind: kindEnd, id: s.id}, nil)
			})
			send := func(n int) {
				require.NoError(t, pp.c.send(outFrame{kind: kindData, id: s.id, data: make([]byte, n)}, nil))
			}
			send(1024)
			<-flushed
			ev, err := s.next(nil)
			require.NoError(t, err)
			require.Equal(t, kindResponse, ev.kind)
			require.Equal(t, tc.keep, ev.head.KeepBody)
			send(2048)
			release()
			if tc.keep {
				require.NoError(t, <-got)
			} else {
				require.ErrorIs(t, <-got, http.ErrBodyReadAfterClose)
			}
		})
	}
}
