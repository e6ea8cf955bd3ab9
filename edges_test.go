package subproc

// Edges a hostile-client review found: where it applies, each test
// compares the same handler served in-process by net/http and through a
// Handle.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("edges", func(ctx context.Context, env *Env) (http.Handler, error) { return edgesMux(), nil })
}

// edgesMux is served both in a child and in-process.
func edgesMux() http.Handler {
	mux := http.NewServeMux()
	// Early hints, then the body: a handler that preloads while the
	// client uploads.
	mux.HandleFunc("/hints-then-read", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "read %d %v", len(b), err)
	})
	// Its own "100 Continue", then the body, as net/http allows.
	mux.HandleFunc("/continue-then-read", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusContinue)
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "read %d %v", len(b), err)
	})
	// A form handler: what it got of the POSTed form.
	mux.HandleFunc("/form", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "name=%q", r.PostFormValue("name"))
	})
	// Declares 5 bytes, writes 10 (which fails), then 5 more, ignoring
	// the error, as a handler that copies from a source that grew does.
	mux.HandleFunc("/content-length-overrun", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5")
		io.WriteString(w, "1234567890")
		io.WriteString(w, "12345")
	})
	// An event stream that flushes each small write, as server-sent
	// events and progress streams do, until the client is gone.
	mux.HandleFunc("/tiny-flushes", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for {
			if _, err := io.WriteString(w, "."); err != nil {
				return
			}
			if err := http.NewResponseController(w).Flush(); err != nil {
				return
			}
		}
	})
	// Reads nothing of its body until the parent has sent 200 bytes of
	// it in frames of one byte, then says what the body holds: the buffers, and what the window
	// charges for them. The body reader is this package's, in the child.
	mux.HandleFunc("/body-held", func(w http.ResponseWriter, r *http.Request) {
		b, ok := r.Body.(*bodyReader)
		if !ok {
			http.Error(w, "not a child's body", http.StatusNotImplemented)
			return
		}
		held := func() (frames, buffers, charged int) {
			b.mu.Lock()
			defer b.mu.Unlock()
			for _, c := range b.chunks {
				frames++
				if c.buf != nil {
					buffers += len(*c.buf)
				}
			}
			return frames, buffers, b.queued
		}
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(time.Millisecond) { // the client's progress, in another process: poll
			if frames, buffers, charged := held(); charged >= 200*frameCost(1) {
				fmt.Fprintf(w, "%d %d %d", frames, buffers, charged)
				return
			}
		}
		http.Error(w, "the body did not come", http.StatusGatewayTimeout)
	})
	// Its write deadline has passed when it answers, as when its work took
	// longer than the deadline it set at the start.
	mux.HandleFunc("/late-for-write-deadline", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.SetWriteDeadline(time.Now().Add(-time.Millisecond))
		io.WriteString(w, "answered after the deadline")
		if err := rc.Flush(); err != nil {
			fmt.Fprintf(os.Stderr, "late-for-write-deadline: flush: %v\n", err)
		}
	})
	return mux
}

// csrfCheck is a middleware that checks a token in the POSTed form, as
// gorilla/csrf and method-override middlewares read it: r.PostFormValue
// parses, and so consumes, the request body.
func csrfCheck(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.PostFormValue("csrf") != "token" {
			http.Error(w, "bad token", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// headStatuses sends req on a new connection to srv and returns the
// statuses of every response head it gets, 1xx included, and the final
// body.
func headStatuses(t *testing.T, srv *httptest.Server, req string) ([]int, string) {
	t.Helper()
	conn := dialRaw(t, srv)
	_, err := io.WriteString(conn, req)
	require.NoError(t, err)
	br := bufio.NewReader(conn)
	var codes []int
	for {
		res, err := http.ReadResponse(br, nil)
		require.NoError(t, err, "after the heads %v", codes)
		codes = append(codes, res.StatusCode)
		if res.StatusCode >= 200 {
			b, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			return codes, string(b)
		}
	}
}

// A client that sends "Expect: 100-continue" (curl does, for large
// bodies) to a module that sends 103 Early Hints, or its own 100, and then
// reads the body gets the heads it gets in-process, intact. (The parent
// wrote the 103 from the exchange's goroutine while its body pump's first
// read of r.Body made net/http write "100 Continue" into the same
// connection's buffer: a data race, which garbled the heads; and a
// module's own 100 came twice.)
func TestEdgeExpectContinueWithEarlyHints(t *testing.T) {
	in := httptest.NewServer(edgesMux())
	t.Cleanup(in.Close)
	sp := serve(t, startModule(t, "edges", Options{}))
	body := strings.Repeat("x", 1000)
	for _, tc := range []struct {
		path string
		want []int // the in-process reference's statuses
	}{
		{"/hints-then-read", []int{103, 100, 200}},
		// In-process the handler's 100 keeps net/http from sending its
		// own at the read: one 100, not two.
		{"/continue-then-read", []int{100, 200}},
	} {
		t.Run(tc.path, func(t *testing.T) {
			req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", tc.path, len(body), body)
			wantCodes, wantBody := headStatuses(t, in, req)
			require.Equal(t, tc.want, wantCodes, "the in-process reference")
			for i := range 50 {
				codes, b := headStatuses(t, sp, req)
				// (The order of the 103 and the 100 may differ: the
				// parent writes them from two goroutines.)
				assert.ElementsMatch(t, wantCodes, codes, "request %d: the heads' statuses", i)
				assert.Equal(t, wantBody, b, "request %d: the body", i)
			}
		})
	}
}

// A middleware in front of the Handle that reads a form field (a CSRF
// check, a method override) parses the form, which consumes the body: the
// module finds the form in r.PostForm, as the handler in-process does.
// (It got an empty body and no form: the client's fields were lost.)
func TestEdgeFormParsedByMiddleware(t *testing.T) {
	in := httptest.NewServer(csrfCheck(edgesMux()))
	t.Cleanup(in.Close)
	sp := serve(t, csrfCheck(startModule(t, "edges", Options{})))
	for _, tg := range []struct{ name, url string }{{"in-process", in.URL}, {"subproc", sp.URL}} {
		res, err := http.PostForm(tg.url+"/form", map[string][]string{"csrf": {"token"}, "name": {"alice"}})
		require.NoError(t, err, tg.name)
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		require.NoError(t, err, tg.name)
		assert.Equal(t, `200 name="alice"`, fmt.Sprint(res.StatusCode, " ", string(b)), tg.name)
	}
}

// A handler whose write exceeds its declared Content-Length gets
// http.ErrContentLength, and net/http counts the bytes of that failed
// write all the same, so that every later write fails too: the client
// sees the response cut, through subproc as in-process. (The child forgot
// the failed write: a later, shorter one went, and the client got a
// response that looked whole.)
func TestEdgeContentLengthOverrunStaysCut(t *testing.T) {
	in := httptest.NewServer(edgesMux())
	t.Cleanup(in.Close)
	sp := serve(t, startModule(t, "edges", Options{}))
	for _, tg := range []struct{ name, url string }{{"in-process", in.URL}, {"subproc", sp.URL}} {
		res, err := http.Get(tg.url + "/content-length-overrun")
		require.NoError(t, err, tg.name)
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "%s: the client read %q, whole", tg.name, b)
	}
}

// heldMemory returns the bytes of the buffers that hold the body
// events queued in the parent for the streams of h's first child, and
// what the flow control charges for them.
func heldMemory(h *Handle) (buffers, charged int) {
	c := firstChild(h)
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.running {
		s.mu.Lock()
		for _, ev := range s.events {
			if ev.kind == kindData {
				charged += ev.charge()
				if ev.buf != nil {
					buffers += cap(*ev.buf)
				}
			}
		}
		s.mu.Unlock()
	}
	return buffers, charged
}

// A stream whose handler flushes tiny writes to a client that reads
// nothing holds, in the parent, no more buffers than its window charges.
// (Each one-byte frame, charged 257 bytes, held a pooled buffer of 4 KiB:
// a stalled stream held about 1 MiB, 16 times the 64.25 KiB the window
// promises, and 1,000 such clients a GiB.)
func TestEdgeTinyFlushesHoldWhatTheyCost(t *testing.T) {
	const stalled = 8
	h := startModule(t, "edges", Options{})
	srv := httptest.NewUnstartedServer(h)
	srv.Listener = smallBufListener{srv.Listener, 4096}
	srv.Start()
	defer srv.Close()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return serr
	}}
	for range stalled {
		conn, err := d.Dial("tcp", srv.Listener.Addr().String())
		require.NoError(t, err)
		defer conn.Close()
		fmt.Fprintf(conn, "GET /tiny-flushes HTTP/1.1\r\nHost: stalled\r\n\r\n")
	}
	// Every stream's window fills with one-byte frames that the parent
	// cannot write to its client.
	full := stalled * (initialWindow - frameCost(chunkSize)/2)
	waitFor(t, 30*time.Second, "the stalled streams' windows to fill", func() bool {
		return h.flow.held.Load() >= int64(full)
	})
	buffers, charged := heldMemory(h)
	ceiling := stalled * initialWindow
	t.Logf("%d stalled streams: %d bytes charged to their windows, %d bytes of buffers held", stalled, charged, buffers)
	assert.LessOrEqual(t, buffers, ceiling, "%d stalled streams hold %d KiB of buffers in the parent, over %d × the %d-byte window (%d KiB)", stalled, buffers>>10, stalled, initialWindow, ceiling>>10)
}

// The same in the child, for a request body that a client trickles a
// byte at a time to a handler that has not read it yet: the child holds no
// more buffers than the window charges. (It held 16 times that, so that a
// few hundred such clients could push a child past its MemoryMax.)
func TestEdgeTrickledBodyHoldsWhatItCosts(t *testing.T) {
	srv := serve(t, startModule(t, "edges", Options{}))
	conn := dialRaw(t, srv)
	_, err := io.WriteString(conn, "POST /body-held HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
	require.NoError(t, err)
	answered := make(chan string, 1)
	go func() {
		br := bufio.NewReader(conn)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			answered <- err.Error()
			return
		}
		b, _ := io.ReadAll(res.Body)
		answered <- string(b)
	}()
	var got string
trickle:
	for range 1000 {
		select {
		case got = <-answered:
			break trickle
		case <-time.After(2 * time.Millisecond): // the client's pace: a byte at a time
		}
		if _, err := io.WriteString(conn, "1\r\nx\r\n"); err != nil {
			got = <-answered
			break
		}
	}
	var frames, buffers, charged int
	_, err = fmt.Sscanf(got, "%d %d %d", &frames, &buffers, &charged)
	require.NoError(t, err, "the handler's answer: %q", got)
	t.Logf("%d chunks queued in the child: %d bytes charged to the window, %d bytes of buffers", frames, charged, buffers)
	assert.LessOrEqual(t, buffers, initialWindow, "the child holds %d KiB of buffers for a body the window (%d bytes) charges %d bytes for", buffers>>10, initialWindow, charged)
}

// A write deadline is a point in time: once it has passed, every write
// to the client fails, whether or not it must wait, and the client gets
// no response, through subproc as in-process (DESIGN 9). (In the child a
// write failed only if it waited for credit past the deadline: a response
// that fit the window went out whole after it.)
func TestEdgePassedWriteDeadlineFailsWrites(t *testing.T) {
	in := httptest.NewServer(edgesMux())
	t.Cleanup(in.Close)
	sp := serve(t, startModule(t, "edges", Options{}))
	for _, tg := range []struct{ name, url string }{{"in-process", in.URL}, {"subproc", sp.URL}} {
		res, err := http.Get(tg.url + "/late-for-write-deadline")
		if err == nil {
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			t.Errorf("%s: the client got %s %q after the handler's write deadline", tg.name, res.Status, b)
		}
	}
}
