package subproc

// Request bodies whose length is not what r.ContentLength says: a
// middleware in front of the Handle may replace the body.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("reqbody", func(ctx context.Context, env *Env) (http.Handler, error) {
		return reqbodyMux(func() { fmt.Fprintln(os.Stderr, "flushing") }), nil
	})
}

// reqbodyMux is the module of this file, served both in a child and
// in-process. /late calls flushing before it flushes.
func reqbodyMux(flushing func()) http.Handler {
	mux := http.NewServeMux()
	// Reads the whole body and says how long it was, and what
	// r.ContentLength said.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "read %d (ContentLength %d) %v", n, r.ContentLength, err)
	})
	// Does some work first, then looks at the declared trailers, as
	// net/http's doc allows before the body is read, then reads the
	// body and answers with the trailer's value.
	mux.HandleFunc("/trailer", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond) // the module's work, not a synchronization
		declared := len(r.Trailer)
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "declared %d, X-T=%q\n", declared, r.Trailer.Get("X-T"))
	})
	// Reads 1 KiB of a trPattern body, answers and flushes, then reads
	// the rest, as HTTP/1 handlers should not (see ResponseWriter's
	// doc): the trailers say what it got.
	mux.HandleFunc("/late", func(w http.ResponseWriter, r *http.Request) {
		first := make([]byte, 1024)
		io.ReadFull(r.Body, first)
		w.Header().Set("Trailer", "X-Read, X-Got")
		io.WriteString(w, "ok")
		flushing()
		w.(http.Flusher).Flush()
		rest, err := io.ReadAll(r.Body)
		w.Header().Set("X-Read", strconv.Itoa(len(rest)))
		whole := bytes.Equal(append(first, rest...), trPattern(len(first)+len(rest)))
		w.Header().Set("X-Got", fmt.Sprintf("%v, bytes the client's %v", err, whole))
	})
	return mux
}

// gunzipBody is a middleware that decompresses a gzip request body in
// place, leaving r.ContentLength as the client sent it.
func gunzipBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			r.Body = io.NopCloser(zr)
			r.Header.Del("Content-Encoding")
		}
		h.ServeHTTP(w, r)
	})
}

// A handler of an HTTP/1 request that answers, and flushes, after 1 KiB of
// its body, then reads the rest, which the client sends only then: as
// in-process, net/http leaves a body of which 256 KiB or more is left to
// the handler, which reads it whole; it discards a shorter one as it writes
// the head, and the handler's later read fails. (The parent's pump, had it
// read on, would have shared the body's bytes with that discard, and the
// module would have read a body with a gap that ended as if whole.)
func TestRequestBodyReadAfterAnswer(t *testing.T) {
	sink := newLogSink()
	h := startModule(t, "reqbody", Options{Stderr: sink})
	closing := func(h http.Handler, value string) http.Handler { // a middleware that closes the connection
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", value)
			h.ServeHTTP(w, r)
		})
	}
	for _, tc := range []struct {
		name      string
		n         int
		closing   string // a middleware's Connection header: "close" keeps net/http from discarding, "Close" does not
		want      string
		wantClose bool // the response closes the connection
	}{
		{"1 MiB", 1 << 20, "", "<nil>, bytes the client's true", true},
		{"100 KiB", 100 << 10, "", http.ErrBodyReadAfterClose.Error() + ", bytes the client's true", false},
		{"100 KiB, Connection: close", 100 << 10, "close", "<nil>, bytes the client's true", true},
		{"100 KiB, Connection: Close", 100 << 10, "Close", http.ErrBodyReadAfterClose.Error() + ", bytes the client's true", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			flushing := make(chan struct{})
			for _, tg := range []struct {
				name     string
				h        http.Handler
				flushing func(before int) bool // reports, within 10 s, that /late flushes; before counts the subproc module's "flushing" lines before the request
			}{
				{"in-process", reqbodyMux(func() { close(flushing) }), func(int) bool {
					select {
					case <-flushing:
						return true
					case <-time.After(10 * time.Second):
						return false
					}
				}},
				{"subproc", h, func(before int) bool {
					return sink.awaitN("flushing", before+1, 10*time.Second)
				}},
			} {
				t.Run(tg.name, func(t *testing.T) {
					body := trPattern(tc.n)
					handler := tg.h
					if tc.closing != "" {
						handler = closing(handler, tc.closing)
					}
					conn := dialRaw(t, serve(t, handler))
					before := strings.Count(sink.String(), "flushing") // (the child may print its line before flushing looks)
					fmt.Fprintf(conn, "POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", tc.n)
					conn.Write(body[:1024])
					require.True(t, tg.flushing(before), "the handler did not answer")
					_, err := conn.Write(body[1024:])
					require.NoError(t, err)
					br := bufio.NewReader(conn)
					res, err := http.ReadResponse(br, nil)
					require.NoError(t, err)
					got, err := io.ReadAll(res.Body)
					require.NoError(t, err)
					require.Equal(t, "ok", string(got))
					assert.Equal(t, tc.want, res.Trailer.Get("X-Got"))
					if !strings.HasPrefix(tc.want, http.ErrBodyReadAfterClose.Error()) {
						assert.Equal(t, strconv.Itoa(tc.n-1024), res.Trailer.Get("X-Read"))
					}
					require.Equal(t, tc.wantClose, res.Close, "the response closes the connection")
					if !res.Close {
						// The connection serves the next request.
						io.WriteString(conn, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
						_, answer := readResponse(t, br)
						assert.Equal(t, "200 OK read 2 (ContentLength 2) <nil>", answer)
					}
				})
			}
		})
	}
}

// A body longer than r.ContentLength reaches the module whole, as the
// handler in-process reads it: the parent had sent only r.ContentLength
// bytes of it (rounded up to a buffer), and then its end.
func TestRequestBodyLongerThanContentLength(t *testing.T) {
	h := startModule(t, "reqbody", Options{})
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(bytes.Repeat([]byte("0123456789"), 100_000)) // 1,000,000 bytes
	zw.Close()
	for _, tg := range []struct {
		name string
		h    http.Handler
	}{{"in-process", reqbodyMux(func() {})}, {"subproc", h}} {
		srv := serve(t, gunzipBody(tg.h))
		req, err := http.NewRequest("POST", srv.URL, bytes.NewReader(z.Bytes()))
		require.NoError(t, err)
		req.Header.Set("Content-Encoding", "gzip")
		res, err := srv.Client().Do(req)
		require.NoError(t, err)
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("read 1000000 (ContentLength %d) <nil>", z.Len()), string(b), tg.name)
	}
}

// A request's trailers are merged into r.Trailer by the handler's read
// that reaches EOF, as in net/http, not when the body's end reaches the
// child: a handler that looks at r.Trailer before it has read its body
// sees none (none were declared), and, under -race, its child's race
// detector finds nothing to say on its stderr.
func TestRequestTrailersMergedAtEOF(t *testing.T) {
	stderr := newLogSink()
	h := startModule(t, "reqbody", Options{Stderr: stderr})
	conn := dialRaw(t, serve(t, h))
	io.WriteString(conn, "POST /trailer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: v\r\n\r\n")
	_, got := readResponse(t, bufio.NewReader(conn))
	assert.Equal(t, "200 OK declared 0, X-T=\"v\"\n", got)
	require.NoError(t, h.Close())
	assert.NotContains(t, stderr.String(), "DATA RACE")
}
