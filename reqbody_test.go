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
	"testing"

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
