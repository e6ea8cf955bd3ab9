package subproc

// Request bodies whose length is not what r.ContentLength says: a
// middleware in front of the Handle may replace the body.

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("reqbody", func(ctx context.Context, env *Env) (http.Handler, error) { return reqbodyHandler(), nil })
}

// reqbodyHandler reads the whole body and says how long it was, and what
// r.ContentLength said.
func reqbodyHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "read %d (ContentLength %d) %v", n, r.ContentLength, err)
	})
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
// handler in-process reads it: the parent sent only r.ContentLength bytes
// of it (rounded up to a buffer), and then its end.
func TestRequestBodyLongerThanContentLength(t *testing.T) {
	h := startModule(t, "reqbody", Options{})
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(bytes.Repeat([]byte("0123456789"), 100_000)) // 1,000,000 bytes
	zw.Close()
	for _, tg := range []struct {
		name string
		h    http.Handler
	}{{"in-process", reqbodyHandler()}, {"subproc", h}} {
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

// isServerBody knows the bodies of net/http's server, HTTP/1 (with and
// without Expect: 100-continue) and HTTP/2, by their unexported types'
// names: were one renamed, the end of a body would wait for credit, and
// this test fails.
func TestIsServerBody(t *testing.T) {
	seen := make(chan bool, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- isServerBody(r.Body)
		io.Copy(io.Discard, r.Body)
	})
	h1 := httptest.NewServer(handler)
	defer h1.Close()
	h2 := httptest.NewUnstartedServer(handler)
	h2.EnableHTTP2 = true
	h2.StartTLS()
	defer h2.Close()
	for _, tc := range []struct {
		name   string
		srv    *httptest.Server
		expect bool
	}{{"HTTP/1", h1, false}, {"HTTP/1 Expect: 100-continue", h1, true}, {"HTTP/2", h2, false}} {
		req, err := http.NewRequest("POST", tc.srv.URL, strings.NewReader("body"))
		require.NoError(t, err)
		if tc.expect {
			req.Header.Set("Expect", "100-continue")
		}
		client := tc.srv.Client()
		client.Transport.(*http.Transport).ExpectContinueTimeout = time.Minute
		res, err := client.Do(req)
		require.NoError(t, err, tc.name)
		res.Body.Close()
		assert.True(t, <-seen, "%s: net/http's body not recognised", tc.name)
	}
	assert.False(t, isServerBody(io.NopCloser(strings.NewReader(""))))
}
