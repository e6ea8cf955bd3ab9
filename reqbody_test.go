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
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("reqbody", func(ctx context.Context, env *Env) (http.Handler, error) { return reqbodyMux(), nil })
}

// reqbodyMux is the module of this file, served both in a child and
// in-process.
func reqbodyMux() http.Handler {
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
	}{{"in-process", reqbodyMux()}, {"subproc", h}} {
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
