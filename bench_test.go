package subproc

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"syscall"
	"testing"
	"time"
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
		// A hijacked connection that sends bytes= bytes in writes of 64 KiB
		// and 10 bytes, as a WebSocket library sends a 64 KiB message
		// with its header.
		mux.HandleFunc("GET /tunnel", func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer conn.Close()
			io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: bench\r\n\r\n")
			msg := bytes.Repeat([]byte("t"), 64<<10+10)
			for n > 0 {
				k := min(n, len(msg))
				if _, err := conn.Write(msg[:k]); err != nil {
					return
				}
				n -= k
			}
		})
		mux.HandleFunc("GET /_cost", func(w http.ResponseWriter, r *http.Request) {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Fprintf(w, "%d %d", ms.Mallocs, processCPU())
		})
		mux.HandleFunc("POST /_profile", func(w http.ResponseWriter, r *http.Request) {
			if file := r.URL.Query().Get("file"); file != "" {
				f, err := os.Create(file)
				if err == nil {
					err = pprof.StartCPUProfile(f)
				}
				if err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
				}
				return
			}
			pprof.StopCPUProfile()
		})
		return mux, nil
	})
}

// childProfile makes the benchmarks that measure their cost write a CPU
// profile of the child too.
var childProfile = flag.String("child.cpuprofile", "", "write the module child's CPU profile to `file` (benchmarks that report child-µs/op)")

// processCPU returns the CPU time this process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A cost measures what a benchmark's operations cost in CPU time in the
// parent and the child, and in allocations in the child (-benchmem counts
// only the parent's).
type cost struct {
	h               *Handle
	parent0, child0 time.Duration
	childMallocs0   uint64
}

func measureCost(b *testing.B, h *Handle) *cost {
	c := &cost{h: h, parent0: processCPU()}
	c.childMallocs0, c.child0 = childCost(b, h)
	if *childProfile != "" {
		file, err := filepath.Abs(*childProfile)
		if err != nil {
			b.Fatal(err)
		}
		h.ServeHTTP(&recordWriter{h: make(http.Header)}, httptest.NewRequest("POST", "/_profile?file="+url.QueryEscape(file), nil))
	}
	return c
}

// report adds the cost per operation to the benchmark's results; call it
// after the benchmark's loop.
func (c *cost) report(b *testing.B) {
	parent := processCPU() - c.parent0
	if *childProfile != "" {
		c.h.ServeHTTP(&recordWriter{h: make(http.Header)}, httptest.NewRequest("POST", "/_profile", nil))
	}
	mallocs, child := childCost(b, c.h)
	n := float64(b.N)
	b.ReportMetric(float64(parent.Microseconds())/n, "parent-µs/op")
	b.ReportMetric(float64((child-c.child0).Microseconds())/n, "child-µs/op")
	b.ReportMetric(float64(mallocs-c.childMallocs0)/n, "child-allocs/op")
}

func childCost(b *testing.B, h *Handle) (mallocs uint64, cpu time.Duration) {
	w := &recordWriter{h: make(http.Header)}
	h.ServeHTTP(w, httptest.NewRequest("GET", "/_cost", nil))
	if _, err := fmt.Sscan(w.body.String(), &mallocs, &cpu); err != nil {
		b.Fatalf("child cost %q: %v", w.body.String(), err)
	}
	return mallocs, cpu
}

// recordWriter is an http.ResponseWriter that keeps the body.
type recordWriter struct {
	h    http.Header
	body bytes.Buffer
}

func (w *recordWriter) Header() http.Header         { return w.h }
func (w *recordWriter) WriteHeader(int)             {}
func (w *recordWriter) Write(p []byte) (int, error) { return w.body.Write(p) }

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
	c := measureCost(b, h)
	for b.Loop() {
		w := &discardWriter{h: make(http.Header)}
		h.ServeHTTP(w, req)
		if w.n != 100 {
			b.Fatalf("body of %d bytes", w.n)
		}
	}
	c.report(b)
}

// BenchmarkServeHTTPParallel is BenchmarkServeHTTP with concurrent requests
// sharing the pipe.
func BenchmarkServeHTTPParallel(b *testing.B) {
	h := startBench(b)
	c := measureCost(b, h)
	defer c.report(b)
	getSmallParallel(b, h)
}

// BenchmarkServeHTTPPool is BenchmarkServeHTTPParallel through pools of
// one and two children.
func BenchmarkServeHTTPPool(b *testing.B) {
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("children=%d", n), func(b *testing.B) {
			h, err := Start(context.Background(), "bench", Options{Logger: discardLogger(), Children: n})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { h.Close() })
			getSmallParallel(b, h)
		})
	}
}

// getSmallParallel runs b.N GET /small through h, 16 goroutines per CPU.
func getSmallParallel(b *testing.B, h *Handle) {
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
	c := measureCost(b, h)
	defer c.report(b)
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

// BenchmarkTunnel measures 64 MiB sent by a handler that hijacked its
// connection, in writes of 64 KiB + 10 bytes (a WebSocket message of 64
// KiB and its header), read by a client over loopback TCP.
func BenchmarkTunnel(b *testing.B) {
	h := startBench(b)
	srv := httptest.NewServer(h)
	defer srv.Close()
	const size = 64 << 20
	b.SetBytes(size)
	b.ReportAllocs()
	c := measureCost(b, h)
	defer c.report(b)
	for b.Loop() {
		conn, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		fmt.Fprintf(conn, "GET /tunnel?bytes=%d HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: bench\r\n\r\n", size)
		br := bufio.NewReaderSize(conn, 64<<10)
		res, err := http.ReadResponse(br, nil)
		if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
			b.Fatalf("upgrade: %v %v", res, err)
		}
		if n, err := io.Copy(io.Discard, br); n != size {
			b.Fatalf("read %d bytes: %v", n, err)
		}
		conn.Close()
	}
}

// httpCases are the handlers that the HTTP benchmarks compare: the bench
// module's /small served in-process, and the module through subproc.
func httpCases() []struct {
	name string
	h    func(*testing.B) http.Handler
} {
	small := bytes.Repeat([]byte("s"), 100)
	inproc := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(small) })
	return []struct {
		name string
		h    func(*testing.B) http.Handler
	}{
		{"inproc", func(*testing.B) http.Handler { return inproc }},
		{"subproc", func(b *testing.B) http.Handler { return startBench(b) }},
	}
}

// getSmall fetches /small from srv and checks its body.
func getSmall(client *http.Client, srv *httptest.Server) error {
	res, err := client.Get(srv.URL + "/small")
	if err != nil {
		return err
	}
	n, _ := io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if n != 100 {
		return fmt.Errorf("body of %d bytes", n)
	}
	return nil
}

// BenchmarkHTTP measures a small GET from a client over loopback TCP,
// through a server whose handler is the module, against the same handler
// served in-process.
func BenchmarkHTTP(b *testing.B) {
	for _, bc := range httpCases() {
		b.Run(bc.name, func(b *testing.B) {
			srv := httptest.NewServer(bc.h(b))
			defer srv.Close()
			client := srv.Client()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if err := getSmall(client, srv); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkHTTPParallel is BenchmarkHTTP with 64 clients, each on its own
// keep-alive connection. It reports the CPU time per request of the
// server's process, and of the child's.
func BenchmarkHTTPParallel(b *testing.B) {
	for _, bc := range httpCases() {
		b.Run(bc.name, func(b *testing.B) {
			h := bc.h(b)
			srv := httptest.NewServer(h)
			defer srv.Close()
			client := srv.Client()
			client.Transport.(*http.Transport).MaxIdleConnsPerHost = 64
			b.ReportAllocs()
			b.SetParallelism(64 / runtime.GOMAXPROCS(0))
			if hd, ok := h.(*Handle); ok {
				c := measureCost(b, hd)
				defer c.report(b)
			} else {
				cpu0 := processCPU()
				defer func() {
					b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "parent-µs/op")
				}()
			}
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := getSmall(client, srv); err != nil {
						b.Error(err)
						return
					}
				}
			})
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
