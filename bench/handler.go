package main

import (
	"bytes"
	"net/http"
	"strconv"
	"sync"
)

// The handler every peer serves. Its HTTP routes are the handler of the
// library's own in-package benchmark module (bench_test.go at the
// repository root), with the chunk size of /stream as a parameter; its
// WebSocket routes are in ws.go.

// smallBody is the body of GET /small.
var smallBody = bytes.Repeat([]byte("s"), 100)

// maxChunk bounds the chunk parameter of /stream.
const maxChunk = 8 << 20

// echoBufs holds the 32 KiB buffers that /echo copies through.
var echoBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// newHandler returns the handler that every peer serves:
//
//	GET  /small                     a 100-byte body
//	POST /echo                      the request body, streamed back
//	GET  /stream?bytes=N&chunk=C    N bytes written C at a time, flushed after each write
//	GET  /ws/echo                   WebSocket: every message echoed (ws.go)
//	GET  /ws/stream?bytes=N&chunk=C WebSocket: N bytes in C-byte binary messages (ws.go)
func newHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /small", serveSmall)
	mux.HandleFunc("POST /echo", serveEcho)
	mux.HandleFunc("GET /stream", serveStream)
	mux.HandleFunc("GET /ws/echo", serveWSEcho)
	mux.HandleFunc("GET /ws/stream", serveWSStream)
	return mux
}

func serveSmall(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	w.Write(smallBody)
}

// serveEcho copies the request body to the response through a 32 KiB
// buffer. Without full duplex, net/http discards the unread rest of an
// HTTP/1 request body when the response starts, and the echo comes back
// short.
func serveEcho(w http.ResponseWriter, r *http.Request) {
	http.NewResponseController(w).EnableFullDuplex()
	w.Header().Set("Content-Type", "application/octet-stream")
	bp := echoBufs.Get().(*[]byte)
	defer echoBufs.Put(bp)
	buf := *bp
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// serveStream writes bytes=N bytes in writes of chunk=C bytes (64 KiB by
// default), flushing after each.
func serveStream(w http.ResponseWriter, r *http.Request) {
	n, c, err := streamParams(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	rc := http.NewResponseController(w)
	chunk := bytes.Repeat([]byte("c"), int(min(n, int64(c))))
	for n > 0 {
		k := min(n, int64(len(chunk)))
		if _, err := w.Write(chunk[:k]); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		n -= k
	}
}

// streamParams parses the query of GET /stream.
func streamParams(r *http.Request) (n int64, chunk int, err error) {
	q := r.URL.Query()
	n, err = strconv.ParseInt(q.Get("bytes"), 10, 64)
	if err != nil || n < 0 {
		return 0, 0, errBadParam("bytes")
	}
	chunk = 64 << 10
	if s := q.Get("chunk"); s != "" {
		chunk, err = strconv.Atoi(s)
		if err != nil || chunk <= 0 || chunk > maxChunk {
			return 0, 0, errBadParam("chunk")
		}
	}
	return n, chunk, nil
}

// errBadParam is the error of a malformed query parameter.
type errBadParam string

func (e errBadParam) Error() string { return "bad or missing query parameter " + string(e) }
