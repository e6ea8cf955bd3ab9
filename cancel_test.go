package subproc

// Tests of what the parent does once a request's context ends before its
// deadline (see exchange.stayOn): the client may still read, or be gone.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() { Register("cancel-mod", cancelModule) }

// cancelMux is served in-process and in the module.
func cancelMux() http.Handler {
	mux := http.NewServeMux()
	// /big?n=N writes N bytes, in 16 KiB writes, whatever its context.
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		w.Header().Set("Content-Length", strconv.Itoa(n))
		buf := make([]byte, 16<<10)
		for i := range buf {
			buf[i] = 'a' + byte(i%26)
		}
		for n > 0 {
			k := min(n, len(buf))
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	// /trickle writes and flushes a byte every 200 ms for 4 s, whatever its
	// context (a typical "stream until done" loop that forgot ctx), until a
	// write fails; with on=1, whether or not they fail.
	mux.HandleFunc("/trickle", func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i < 20; i++ {
			if _, err := w.Write([]byte("x")); err != nil && r.URL.Query().Get("on") == "" {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(200 * time.Millisecond)
		}
	})
	// /count reads its whole body, then says how long it was.
	mux.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "n=%d err=%v", n, err)
	})
	return mux
}

func cancelModule(ctx context.Context, env *Env) (http.Handler, error) { return cancelMux(), nil }

// slowHalfClosedGet sends GET path, half-closes, and reads the answer slowly
// (4 KiB every 100 ms, with a small receive buffer): it returns how many
// body bytes arrived and the error that ended the read.
func slowHalfClosedGet(addr, path string) (int, error) {
	conn, err := halfClosedConn(addr, path)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	conn.SetReadBuffer(4096)
	br := bufio.NewReaderSize(conn, 4096)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	got := 0
	buf := make([]byte, 4096)
	for {
		n, err := res.Body.Read(buf)
		got += n
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return got, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A client that half-closes its connection and reads at 40 KB/s gets the
// whole answer, as in-process. The grace counts the module's silence, not
// the parent's writes to a slow client: it used to run on while the parent
// waited in a write to that client, and the response was cut.
func TestCancelHalfClosedSlowReader(t *testing.T) {
	const n = 192 << 10
	h := startModule(t, "cancel-mod", Options{HealthInterval: time.Hour})
	mk := func(hd http.Handler) *httptest.Server {
		srv := httptest.NewUnstartedServer(hd)
		srv.Listener = smallBufListener{srv.Listener, 4096}
		srv.Start()
		t.Cleanup(srv.Close)
		return srv
	}
	in, sp := mk(cancelMux()), mk(h)
	type out struct {
		n   int
		err error
	}
	inC := make(chan out, 1)
	go func() {
		n, err := slowHalfClosedGet(in.Listener.Addr().String(), "/big?n="+strconv.Itoa(n))
		inC <- out{n, err}
	}()
	gotSP, errSP := slowHalfClosedGet(sp.Listener.Addr().String(), "/big?n="+strconv.Itoa(n))
	o := <-inC
	require.NoError(t, o.err, "in-process")
	require.Equal(t, n, o.n, "in-process the half-closed slow client reads it all")
	assert.NoError(t, errSP, "through the Handle, after %d of %d bytes", gotSP, n)
	assert.Equal(t, n, gotSP, "through the Handle the half-closed slow client should read it all, as in-process")
}

// A HEAD whose client has gone for good, to a module that ignores its
// context and keeps writing (and flushing): net/http drops a HEAD
// response's body, so no write to the client fails. Once the head is out,
// the parent gives the request up at the context's end, as nothing more
// can reach the client; a handler that runs on (this one ignores its
// writes' failures) counts toward StuckTimeout. (The parent used to wait
// for as long as the module wrote, unseen by stuck detection.)
func TestCancelHeadGivenUp(t *testing.T) {
	var ev eventLog
	h := startModule(t, "cancel-mod", Options{HealthInterval: 100 * time.Millisecond, StuckTimeout: 300 * time.Millisecond, OnEvent: ev.add, LogDir: t.TempDir()})
	inServe, conn := servedConn(t, h)
	fmt.Fprintf(conn, "HEAD /trickle?on=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "HEAD"})
	require.NoError(t, err)
	res.Body.Close()
	conn.Close() // gone for good
	waitFor(t, 10*time.Second, "the request given up", func() bool { return inServe.Load() == 0 })
	_, forgotten := firstChild(h).givenUpSince()
	assert.Equal(t, 1, forgotten, "the handler, which trickles for 4 s, should run on, given up")
	waitFor(t, 10*time.Second, "ChildStuck", func() bool { return ev.count(ChildStuck, "") == 1 })
}

// servedConn serves h and returns a connection to it, and how many
// requests are in h.ServeHTTP.
func servedConn(t *testing.T, h *Handle) (*atomic.Int32, net.Conn) {
	t.Helper()
	inServe := new(atomic.Int32)
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inServe.Add(1)
		defer inServe.Add(-1)
		h.ServeHTTP(w, r)
	}))
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return inServe, conn
}

// The same trickle to a GET whose client closed its connection is given
// up within a few writes: the first that reaches the client fails.
func TestCancelGoneClientGivenUp(t *testing.T) {
	h := startModule(t, "cancel-mod", Options{HealthInterval: time.Hour})
	inServe, conn := servedConn(t, h)
	fmt.Fprintf(conn, "GET /trickle?on=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, res.StatusCode)
	conn.Close()
	start := time.Now()
	waitFor(t, 10*time.Second, "the give-up", func() bool { return inServe.Load() == 0 })
	_, forgotten := firstChild(h).givenUpSince()
	assert.Equal(t, 1, forgotten, "the handler, which trickles for 4 s, should run on, given up")
	t.Logf("given up after %v", time.Since(start))
}

// A middleware cancels the request's context, and the client uploads its
// body in three parts 600 ms apart. The handler reads it all and answers,
// as in-process: the grace does not run while the client still sends the
// body, which the module may wait for. (It used to, and the client got a
// 503.)
func TestCancelSlowUpload(t *testing.T) {
	h := startModule(t, "cancel-mod", Options{HealthInterval: time.Hour})
	cancelFirst := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithCancel(r.Context())
			cancel()
			next.ServeHTTP(w, r.WithContext(ctx))
		})
	}
	post := func(srv *httptest.Server) (int, string) {
		pr, pw := io.Pipe()
		go func() {
			for i := 0; i < 3; i++ {
				pw.Write([]byte("abc"))
				time.Sleep(600 * time.Millisecond)
			}
			pw.Close()
		}()
		res, err := http.Post(srv.URL+"/count", "text/plain", pr)
		require.NoError(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	codeIn, bodyIn := post(serve(t, cancelFirst(cancelMux())))
	codeSP, bodySP := post(serve(t, cancelFirst(h)))
	require.Equal(t, http.StatusOK, codeIn, bodyIn)
	assert.Equal(t, codeIn, codeSP, "through the Handle: %q; in-process: %q", bodySP, bodyIn)
	assert.Equal(t, bodyIn, bodySP)
}
