package subproc

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
)

func init() {
	Register("bench", func(ctx context.Context, env *Env) (http.Handler, error) {
		small := bytes.Repeat([]byte("s"), 100)
		chunk := bytes.Repeat([]byte("c"), 64<<10)
		mux := http.NewServeMux()
		mux.HandleFunc("GET /small", func(w http.ResponseWriter, r *http.Request) {
			w.Write(small)
		})
		mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
			// Without full duplex, net/http (in-process as through
			// subproc) discards the unread rest of an HTTP/1 body when
			// the response starts, and the echo comes back short.
			http.NewResponseController(w).EnableFullDuplex()
			io.Copy(w, r.Body)
		})
		mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
			for n > 0 {
				k := min(n, len(chunk))
				if _, err := w.Write(chunk[:k]); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				n -= k
			}
		})
		return mux, nil
	})
}

// discardWriter is an http.ResponseWriter that keeps nothing, so that
// benchmarks of ServeHTTP measure the library alone.
type discardWriter struct {
	h http.Header
	n int64
}

func (w *discardWriter) Header() http.Header { return w.h }
func (w *discardWriter) WriteHeader(int)     {}
func (w *discardWriter) Flush()              {}
func (w *discardWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}

func startBench(b *testing.B) *Handle {
	b.Helper()
	h, err := Start(context.Background(), "bench", Options{Logger: discardLogger()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	return h
}

// BenchmarkServeHTTP measures one small GET through ServeHTTP, without a
// network: the parent's and the child's work and the pipe's round trip.
func BenchmarkServeHTTP(b *testing.B) {
	h := startBench(b)
	req := httptest.NewRequest("GET", "/small", nil)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		w := &discardWriter{h: make(http.Header)}
		h.ServeHTTP(w, req)
		if w.n != 100 {
			b.Fatalf("body of %d bytes", w.n)
		}
	}
}

// BenchmarkServeHTTPParallel is BenchmarkServeHTTP with concurrent requests
// sharing the pipe.
func BenchmarkServeHTTPParallel(b *testing.B) {
	h := startBench(b)
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		req := httptest.NewRequest("GET", "/small", nil)
		for pb.Next() {
			w := &discardWriter{h: make(http.Header)}
			h.ServeHTTP(w, req)
			if w.n != 100 {
				b.Errorf("body of %d bytes", w.n)
				return
			}
		}
	})
}

// BenchmarkEcho measures a 64 KiB POST echoed back.
func BenchmarkEcho(b *testing.B) {
	h := startBench(b)
	body := bytes.Repeat([]byte("e"), 64<<10)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		req := httptest.NewRequest("POST", "/echo", bytes.NewReader(body))
		w := &discardWriter{h: make(http.Header)}
		h.ServeHTTP(w, req)
		if w.n != int64(len(body)) {
			b.Fatalf("echoed %d bytes", w.n)
		}
	}
}

// BenchmarkStream measures a 64 MiB response streamed in flushed 64 KiB
// writes.
func BenchmarkStream(b *testing.B) {
	h := startBench(b)
	const size = 64 << 20
	req := httptest.NewRequest("GET", "/stream?bytes="+strconv.Itoa(size), nil)
	b.SetBytes(size)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		w := &discardWriter{h: make(http.Header)}
		h.ServeHTTP(w, req)
		if w.n != size {
			b.Fatalf("streamed %d bytes", w.n)
		}
	}
}

// BenchmarkHTTP measures a small GET from a client over loopback TCP,
// through a server whose handler is the module, against the same handler
// served in-process.
func BenchmarkHTTP(b *testing.B) {
	small := bytes.Repeat([]byte("s"), 100)
	inproc := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(small) })
	for _, bc := range []struct {
		name string
		h    func(*testing.B) http.Handler
	}{
		{"inproc", func(*testing.B) http.Handler { return inproc }},
		{"subproc", func(b *testing.B) http.Handler { return startBench(b) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			srv := httptest.NewServer(bc.h(b))
			defer srv.Close()
			client := srv.Client()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				res, err := client.Get(srv.URL + "/small")
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if n != 100 {
					b.Fatalf("body of %d bytes", n)
				}
			}
		})
	}
}

// BenchmarkStartClose measures starting a module's child until it is
// ready, and shutting it down.
func BenchmarkStartClose(b *testing.B) {
	for b.Loop() {
		h, err := Start(context.Background(), "bench", Options{Logger: discardLogger()})
		if err != nil {
			b.Fatal(err)
		}
		if err := h.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
