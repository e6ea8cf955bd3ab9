// Package wstest runs gorilla/websocket and coder/websocket servers in
// subproc modules, driven by each library's own Go client, and by headless
// Chromium (browser_test.go), through a Handle. It is a module of its own so
// that the WebSocket libraries and chromedp stay out of the library's go.mod.
package wstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/fbbf71ac/subproc"
	gorilla "github.com/gorilla/websocket"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	subproc.Main()
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	goleak.VerifyTestMain(m)
}

// Both modules serve the same paths:
//
//	/echo   echoes every message, with its type, until the client closes
//	/bye    reads one message, then closes with 1000 "bye"
//	/flood  sends 1 MiB messages until the write fails
//	/drain  sends "ready", then closes with 1001 when the ModuleFunc's ctx ends
func init() {
	subproc.Register("ws-gorilla", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		up := gorilla.Upgrader{ReadBufferSize: 64 << 10, WriteBufferSize: 64 << 10}
		mux := http.NewServeMux()
		mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			c.SetReadLimit(2 << 20)
			for {
				typ, p, err := c.ReadMessage()
				if err != nil {
					return
				}
				if err := c.WriteMessage(typ, p); err != nil {
					return
				}
			}
		})
		mux.HandleFunc("/bye", func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			c.ReadMessage()
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(gorilla.CloseNormalClosure, "bye"), time.Now().Add(10*time.Second))
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			for { // until the client's close frame comes back
				if _, _, err := c.ReadMessage(); err != nil {
					return
				}
			}
		})
		mux.HandleFunc("/flood", func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			go func() { // reads, to see the close
				for {
					if _, _, err := c.NextReader(); err != nil {
						c.Close()
						return
					}
				}
			}()
			p := make([]byte, 1<<20)
			for {
				if err := c.WriteMessage(gorilla.BinaryMessage, p); err != nil {
					return
				}
			}
		})
		mux.HandleFunc("/drain", func(w http.ResponseWriter, r *http.Request) {
			c, err := up.Upgrade(w, r, nil)
			if err != nil {
				return
			}
			defer c.Close()
			c.WriteMessage(gorilla.TextMessage, []byte("ready"))
			<-ctx.Done()
			c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(gorilla.CloseGoingAway, "draining"), time.Now().Add(10*time.Second))
		})
		return mux, nil
	})
	subproc.Register("ws-coder", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			c.SetReadLimit(2 << 20)
			for {
				typ, rd, err := c.Reader(r.Context())
				if err != nil {
					return
				}
				wr, err := c.Writer(r.Context(), typ)
				if err != nil {
					return
				}
				if _, err := io.Copy(wr, rd); err != nil {
					return
				}
				if err := wr.Close(); err != nil {
					return
				}
			}
		})
		mux.HandleFunc("/bye", func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			c.Read(r.Context())
			c.Close(websocket.StatusNormalClosure, "bye")
		})
		mux.HandleFunc("/flood", func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			ctx := c.CloseRead(r.Context())
			p := make([]byte, 1<<20)
			for {
				if err := c.Write(ctx, websocket.MessageBinary, p); err != nil {
					return
				}
			}
		})
		mux.HandleFunc("/drain", func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			c.Write(r.Context(), websocket.MessageText, []byte("ready"))
			<-ctx.Done()
			c.Close(websocket.StatusGoingAway, "draining")
		})
		return mux, nil
	})
}

// A client is one library's client, reduced to what the tests need.
type client interface {
	dial(t *testing.T, url string) clientConn
}

type clientConn interface {
	write(binary bool, p []byte) error
	read() (binary bool, p []byte, err error)
	ping() error                      // sends a ping and waits for its pong
	close(code int, why string) error // the close handshake, from the client
	closeStatus(err error) int        // the close code err carries, -1 for none
	abort()                           // closes the TCP connection
}

var libraries = []struct {
	module string
	client client
}{
	{"ws-gorilla", gorillaClient{}},
	{"ws-coder", coderClient{}},
}

// start starts module behind an httptest.Server and returns the server's
// ws:// URL.
func start(t *testing.T, module string) (*subproc.Handle, string) {
	t.Helper()
	h, err := subproc.Start(context.Background(), module, subproc.Options{Stderr: testWriter{t}, Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := h.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return h, "ws" + strings.TrimPrefix(srv.URL, "http")
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Logf("%s", p); return len(p), nil }

// TestEcho sends 10,000 messages of 1 B to 1 MiB, text and binary, over 8
// connections at once, and checks every byte of every echo.
func TestEcho(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			_, url := start(t, lib.module)
			const conns, total = 8, 10_000
			var wg sync.WaitGroup
			var echoed atomic.Int64
			start := time.Now()
			errs := make(chan error, conns)
			for k := range conns {
				c := lib.client.dial(t, url+"/echo")
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(k), 1))
					for i := k; i < total; i += conns {
						// Sizes from 1 B to 1 MiB, spread evenly over
						// the powers of two, each byte random.
						size := 1 << (i % 21)
						size += rng.IntN(size)
						size = min(size, 1<<20)
						p := make([]byte, size)
						for j := range p {
							p[j] = byte(rng.Uint32())
						}
						binary := i%2 == 0
						if !binary {
							for j := range p {
								p[j] = 'a' + p[j]%26
							}
						}
						if err := c.write(binary, p); err != nil {
							errs <- fmt.Errorf("message %d: write: %v", i, err)
							return
						}
						gotBinary, got, err := c.read()
						if err != nil {
							errs <- fmt.Errorf("message %d: read: %v", i, err)
							return
						}
						if gotBinary != binary || !bytes.Equal(got, p) {
							errs <- fmt.Errorf("message %d of %d bytes: echo differs (binary %v, %d bytes)", i, size, gotBinary, len(got))
							return
						}
						echoed.Add(int64(size))
					}
					if err := c.close(1000, ""); err != nil {
						errs <- fmt.Errorf("close: %v", err)
					}
				})
			}
			wg.Wait()
			t.Logf("%d messages, %d MiB echoed and checked in %v", total, echoed.Load()>>20, time.Since(start).Round(time.Millisecond))
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// TestPingPong: a ping from the client gets the server's pong.
func TestPingPong(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			_, url := start(t, lib.module)
			c := lib.client.dial(t, url+"/echo")
			for range 10 {
				if err := c.ping(); err != nil {
					t.Fatalf("ping: %v", err)
				}
			}
			if err := c.close(1000, ""); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCloseFromServer: the server starts the close handshake; the client
// sees its code and reason.
func TestCloseFromServer(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			_, url := start(t, lib.module)
			c := lib.client.dial(t, url+"/bye")
			if err := c.write(false, []byte("hi")); err != nil {
				t.Fatal(err)
			}
			_, _, err := c.read()
			if code := c.closeStatus(err); code != 1000 || !strings.Contains(err.Error(), "bye") {
				t.Fatalf("read after the server closed: %v (code %d), want 1000 \"bye\"", err, code)
			}
			c.abort()
		})
	}
}

// TestSlowReader: a client that stops reading a flood stalls only its own
// connection: another echoes meanwhile.
func TestSlowReader(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			h, url := start(t, lib.module)
			slow := lib.client.dial(t, url+"/flood")
			if _, p, err := slow.read(); err != nil || len(p) != 1<<20 {
				t.Fatalf("first flood message: %d bytes, %v", len(p), err)
			}
			// The flood now fills the windows and stops; the module's
			// other connections go on.
			c := lib.client.dial(t, url+"/echo")
			for i := range 200 {
				p := bytes.Repeat([]byte{byte(i)}, 32<<10)
				if err := c.write(true, p); err != nil {
					t.Fatal(err)
				}
				if _, got, err := c.read(); err != nil || !bytes.Equal(got, p) {
					t.Fatalf("echo %d beside a stalled connection: %v", i, err)
				}
			}
			if n := h.Stats().InFlight; n != 2 {
				t.Fatalf("%d requests in flight, want the 2 connections", n)
			}
			c.close(1000, "")
			slow.abort()
		})
	}
}

// TestManyConnections: 200 connections at once, each echoing.
func TestManyConnections(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			_, url := start(t, lib.module)
			const n = 200
			conns := make([]clientConn, n)
			for i := range conns {
				conns[i] = lib.client.dial(t, url+"/echo")
			}
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i, c := range conns {
				wg.Go(func() {
					for j := range 10 {
						p := fmt.Appendf(nil, "conn %d message %d", i, j)
						if err := c.write(false, p); err != nil {
							errs <- err
							return
						}
						if _, got, err := c.read(); err != nil || !bytes.Equal(got, p) {
							errs <- fmt.Errorf("conn %d: echo %q, %v", i, got, err)
							return
						}
					}
					if err := c.close(1000, ""); err != nil {
						errs <- fmt.Errorf("conn %d: close: %v", i, err)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// TestDrain: at Shutdown the ModuleFunc's ctx ends, and the module's close
// frame reaches the client.
func TestDrain(t *testing.T) {
	for _, lib := range libraries {
		t.Run(lib.module, func(t *testing.T) {
			h, url := start(t, lib.module)
			c := lib.client.dial(t, url+"/drain")
			if _, p, err := c.read(); err != nil || string(p) != "ready" {
				t.Fatalf("read %q, %v", p, err)
			}
			done := make(chan error, 1)
			go func() { done <- h.Close() }()
			_, _, err := c.read()
			if code := c.closeStatus(err); code != 1001 {
				t.Fatalf("read during the drain: %v (code %d), want 1001", err, code)
			}
			c.abort()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// gorillaClient is gorilla/websocket's client.
type gorillaClient struct{}

type gorillaConn struct {
	c    *gorilla.Conn
	pong chan struct{}
}

func (gorillaClient) dial(t *testing.T, url string) clientConn {
	t.Helper()
	d := gorilla.Dialer{ReadBufferSize: 64 << 10, WriteBufferSize: 64 << 10, HandshakeTimeout: 30 * time.Second}
	c, resp, err := d.Dial(url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	resp.Body.Close()
	c.SetReadLimit(2 << 20)
	t.Cleanup(func() { c.Close() })
	gc := &gorillaConn{c: c, pong: make(chan struct{}, 1)}
	c.SetPongHandler(func(string) error {
		gc.pong <- struct{}{}
		return nil
	})
	return gc
}

func (g *gorillaConn) write(binary bool, p []byte) error {
	typ := gorilla.TextMessage
	if binary {
		typ = gorilla.BinaryMessage
	}
	return g.c.WriteMessage(typ, p)
}

func (g *gorillaConn) read() (bool, []byte, error) {
	typ, p, err := g.c.ReadMessage()
	return typ == gorilla.BinaryMessage, p, err
}

func (g *gorillaConn) ping() error {
	if err := g.c.WriteControl(gorilla.PingMessage, []byte("p"), time.Now().Add(10*time.Second)); err != nil {
		return err
	}
	// The pong handler runs inside a read; the echo of a message ends it.
	if err := g.c.WriteMessage(gorilla.TextMessage, []byte("x")); err != nil {
		return err
	}
	if _, _, err := g.c.ReadMessage(); err != nil {
		return err
	}
	select {
	case <-g.pong:
		return nil
	default:
		return errors.New("no pong before the echo that followed the ping")
	}
}

func (g *gorillaConn) close(code int, why string) error {
	if err := g.c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(code, why), time.Now().Add(10*time.Second)); err != nil {
		return err
	}
	g.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		_, _, err := g.c.ReadMessage()
		if err == nil {
			continue
		}
		g.c.Close()
		if gorilla.IsCloseError(err, code) {
			return nil
		}
		return fmt.Errorf("the server's answer to close: %v", err)
	}
}

func (g *gorillaConn) closeStatus(err error) int {
	var ce *gorilla.CloseError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return -1
}

func (g *gorillaConn) abort() { g.c.Close() }

// coderClient is coder/websocket's client.
type coderClient struct{}

type coderConn struct{ c *websocket.Conn }

func (coderClient) dial(t *testing.T, url string) clientConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	if resp.Body != nil {
		resp.Body.Close()
	}
	c.SetReadLimit(2 << 20)
	t.Cleanup(func() { c.CloseNow() })
	return &coderConn{c}
}

func (c *coderConn) write(binary bool, p []byte) error {
	typ := websocket.MessageText
	if binary {
		typ = websocket.MessageBinary
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return c.c.Write(ctx, typ, p)
}

func (c *coderConn) read() (bool, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	typ, p, err := c.c.Read(ctx)
	return typ == websocket.MessageBinary, p, err
}

func (c *coderConn) ping() error {
	// coder/websocket reads pongs inside a read: one runs meanwhile.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	readErr := make(chan error, 1)
	rctx, stopRead := context.WithCancel(ctx)
	go func() {
		_, _, err := c.c.Read(rctx)
		readErr <- err
	}()
	err := c.c.Ping(ctx)
	// Ends the read with an echo, not a cancel: a canceled read closes the
	// connection.
	if werr := c.c.Write(ctx, websocket.MessageText, []byte("x")); werr != nil && err == nil {
		err = werr
	}
	if rerr := <-readErr; rerr != nil && err == nil {
		err = rerr
	}
	stopRead()
	return err
}

func (c *coderConn) close(code int, why string) error {
	return c.c.Close(websocket.StatusCode(code), why)
}

func (c *coderConn) closeStatus(err error) int {
	if s := websocket.CloseStatus(err); s != -1 {
		return int(s)
	}
	return -1
}

func (c *coderConn) abort() { c.c.CloseNow() }
