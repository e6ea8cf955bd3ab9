package subproc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The modules of this file answer upgrades to "upg-echo", a protocol that
// echoes what the client sends until it closes its side.
func init() {
	Register("upg", func(ctx context.Context, env *Env) (http.Handler, error) {
		var (
			mu       sync.Mutex
			lastErr  = "none" // how the last /vanish handler's read ended
			drainSaw = false  // a /drain handler saw the ModuleFunc's ctx end
		)
		mux := http.NewServeMux()
		mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%q %q %q", r.Header.Get("Connection"), r.Header.Get("Upgrade"), r.Header.Get("Keep-Alive"))
		})
		// As gorilla/websocket does: hijack, then write the 101 into the
		// conn.
		mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				http.Error(w, err.Error(), http.StatusNotImplemented)
				return
			}
			defer conn.Close()
			io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: upg-echo\r\n\r\n")
			io.Copy(conn, brw)
			conn.(interface{ CloseWrite() error }).CloseWrite()
		})
		// As coder/websocket does: WriteHeader(101), then hijack.
		mux.HandleFunc("/echo-wh", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Upgrade", "upg-echo")
			w.WriteHeader(http.StatusSwitchingProtocols)
			conn, brw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				panic(err)
			}
			defer conn.Close()
			io.Copy(conn, brw)
		})
		mux.HandleFunc("/vanish", func(w http.ResponseWriter, r *http.Request) {
			conn := switchProtocols(w)
			defer conn.Close()
			_, err := io.Copy(io.Discard, conn)
			mu.Lock()
			lastErr = fmt.Sprint(err) // nil: EOF
			mu.Unlock()
		})
		mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(w, "%s %v", lastErr, drainSaw)
		})
		mux.HandleFunc("/deadline", func(w http.ResponseWriter, r *http.Request) {
			conn := switchProtocols(w)
			defer conn.Close()
			conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, err := conn.Read(make([]byte, 1))
			fmt.Fprintf(conn, "%v", errors.Is(err, os.ErrDeadlineExceeded))
		})
		// Closes its conn with a last word when the ModuleFunc's ctx ends.
		mux.HandleFunc("/drain", func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			defer conn.Close()
			io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: upg-echo\r\n\r\nready")
			<-ctx.Done()
			io.WriteString(conn, "bye")
		})
		// Half-closes: writes its address view and "hello", closes its
		// side, then counts what the client sends until EOF; then
		// Close makes reads and writes fail with net.ErrClosed.
		mux.HandleFunc("/half", func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: upg-echo\r\n\r\n%s|%v|%s|hello", conn.RemoteAddr(), conn.RemoteAddr().String() == r.RemoteAddr, conn.LocalAddr())
			conn.(interface{ CloseWrite() error }).CloseWrite()
			n, err := io.Copy(io.Discard, conn)
			conn.Close()
			_, rerr := conn.Read(make([]byte, 1))
			_, werr := conn.Write([]byte("x"))
			mu.Lock()
			lastErr = fmt.Sprintf("%d,%v,%v,%v", n, err, errors.Is(rerr, net.ErrClosed), errors.Is(werr, net.ErrClosed))
			mu.Unlock()
		})
		mux.HandleFunc("/late", hijackLate)
		// Hijack, answer 101, then panic, or return, leaving the conn
		// open and unreachable.
		mux.HandleFunc("/drop-panic", func(w http.ResponseWriter, r *http.Request) {
			switchProtocols(w)
			panic("upg: a bug after Hijack")
		})
		mux.HandleFunc("/drop-return", func(w http.ResponseWriter, r *http.Request) {
			switchProtocols(w)
		})
		mux.HandleFunc("/gc", func(w http.ResponseWriter, r *http.Request) {
			runtime.GC()
			io.WriteString(w, "collected")
		})
		// Says when its request's context ends, then echoes until EOF.
		mux.HandleFunc("/outlive", func(w http.ResponseWriter, r *http.Request) {
			conn := switchProtocols(w)
			defer conn.Close()
			<-r.Context().Done()
			fmt.Fprintf(conn, "done: %v\n", context.Cause(r.Context()))
			io.Copy(conn, conn)
		})
		mux.HandleFunc("/local", func(w http.ResponseWriter, r *http.Request) {
			a, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
			fmt.Fprintf(w, "%v", a)
		})
		// Deadlines before a hijack, through http.ResponseController.
		mux.HandleFunc("/rdl", func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			rc.EnableFullDuplex()
			if err := rc.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
				fmt.Fprintf(w, "SetReadDeadline: %v", err)
				return
			}
			_, err := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%v", errors.Is(err, os.ErrDeadlineExceeded))
		})
		mux.HandleFunc("/wdl", func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			if err := rc.SetWriteDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
				panic(err)
			}
			rc.Flush()
			p := make([]byte, 64<<10)
			var err error
			for i := 0; i < 10_000 && err == nil; i++ { // 640 MiB: more than every buffer on the way
				_, err = w.Write(p)
			}
			mu.Lock()
			lastErr = fmt.Sprint(errors.Is(err, os.ErrDeadlineExceeded))
			mu.Unlock()
		})
		mux.HandleFunc("/h2", func(w http.ResponseWriter, r *http.Request) {
			_, _, err := http.NewResponseController(w).Hijack()
			fmt.Fprintf(w, "%v", errors.Is(err, http.ErrNotSupported))
		})
		return mux, nil
	})
}

// upgEchoReset upgrades a connection to srv's path, an echo, checks one
// echo (the i-th of the test), then resets the connection.
func upgEchoReset(t *testing.T, srv *httptest.Server, path string, i int) {
	t.Helper()
	conn, br, resp := upgDial(t, srv, path)
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode, "upgrade %d", i)
	io.WriteString(conn, "ping")
	_, err := io.ReadFull(br, make([]byte, 4))
	require.NoError(t, err, "echo %d", i)
	conn.(*net.TCPConn).SetLinger(0) // the close resets the connection
	conn.Close()
}

// upgDial sends an upgrade request for path to srv and returns the
// connection, its reader, and the response head.
func upgDial(t *testing.T, srv *httptest.Server, path string) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, Upgrade\r\nUpgrade: upg-echo\r\nKeep-Alive: timeout=5\r\n\r\n", path)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response to the upgrade: %v", err)
	}
	return conn, br, resp
}

func TestUpgradeHeadersReachModule(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	conn, br, resp := upgDial(t, srv, "/headers")
	defer conn.Close()
	body, _ := io.ReadAll(io.LimitReader(br, resp.ContentLength))
	if got, want := string(body), `"Upgrade" "upg-echo" ""`; got != want {
		t.Fatalf("the module saw Connection, Upgrade, Keep-Alive = %s, want %s", got, want)
	}
	// Without Connection: upgrade, Upgrade is hop-by-hop as before.
	req, _ := http.NewRequest("GET", srv.URL+"/headers", nil)
	req.Header.Set("Upgrade", "upg-echo")
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if got, want := string(b), `"" "" ""`; got != want {
		t.Fatalf("without Connection: upgrade the module saw %s, want %s", got, want)
	}
}

// TestUpgradeEcho sends 8 MiB through an upgraded connection while reading
// the echo, both directions at once, and checks every byte, for both ways
// a handler writes its 101.
func TestUpgradeEcho(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	for _, path := range []string{"/echo", "/echo-wh"} {
		t.Run(path, func(t *testing.T) {
			conn, br, resp := upgDial(t, srv, path)
			if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "upg-echo" {
				t.Fatalf("response %d %v, want 101 with Upgrade: upg-echo", resp.StatusCode, resp.Header)
			}
			data := make([]byte, 8<<20)
			rand.Read(data)
			werr := make(chan error, 1)
			go func() {
				for p := data; len(p) > 0; {
					n := min(len(p), 100_000)
					if _, err := conn.Write(p[:n]); err != nil {
						werr <- err
						return
					}
					p = p[n:]
				}
				werr <- conn.(*net.TCPConn).CloseWrite()
			}()
			got, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("reading the echo: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("writing: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("echo of %d bytes differs: got %d bytes", len(data), len(got))
			}
		})
	}
}

// TestUpgradeChildDies: the client's upgraded connection ends as soon as
// the child dies.
func TestUpgradeChildDies(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	conn, br, _ := upgDial(t, srv, "/echo")
	io.WriteString(conn, "ping")
	p := make([]byte, 4)
	if _, err := io.ReadFull(br, p); err != nil || string(p) != "ping" {
		t.Fatalf("echo: %q, %v", p, err)
	}
	syscall.Kill(h.Stats().Pid, syscall.SIGKILL)
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the child died, the client read %v, want io.EOF", err)
	}
}

// TestUpgradeClientVanishes: the handler's conn reads EOF when the client
// closes its connection, and its handler returns.
func TestUpgradeClientVanishes(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	conn, _, _ := upgDial(t, srv, "/vanish")
	io.WriteString(conn, "some bytes")
	conn.Close()
	waitFor(t, 20*time.Second, "the handler's read to end", func() bool {
		res, err := srv.Client().Get(srv.URL + "/status")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		return string(b) == "<nil> false"
	})
}

// TestUpgradeClientResets: a client that resets its idle upgraded
// connection ends the tunnel, which gives back its MaxInFlight place.
// (The parent, having given the stream up, dropped the child's abort that
// it waited for: the tunnel held its place, a goroutine and a socket until
// the child died.)
func TestUpgradeClientResets(t *testing.T) {
	h := startModule(t, "upg", Options{MaxInFlight: 1})
	srv := httptest.NewServer(h)
	defer srv.Close()
	for i := range 3 {
		upgEchoReset(t, srv, "/echo", i)
		waitFor(t, 20*time.Second, "the tunnel to end", func() bool { return h.Stats().InFlight == 0 })
	}
}

// TestUpgradeDeadline: a hijacked conn's read deadline makes Read fail
// with os.ErrDeadlineExceeded.
func TestUpgradeDeadline(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	_, br, _ := upgDial(t, srv, "/deadline")
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "true" {
		t.Fatalf("the handler's read after its deadline: errors.Is(err, os.ErrDeadlineExceeded) = %q (%v), want true", got, err)
	}
}

// TestUpgradeDrain: Shutdown cancels the ModuleFunc's context, and the
// module's last words reach the client before its connection closes.
func TestUpgradeDrain(t *testing.T) {
	h, err := Start(context.Background(), "upg", testOptions(t, Options{}))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	_, br, _ := upgDial(t, srv, "/drain")
	p := make([]byte, 5)
	if _, err := io.ReadFull(br, p); err != nil || string(p) != "ready" {
		t.Fatalf("read %q, %v", p, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		stopAndReap(t, h)
	}()
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "bye" {
		t.Fatalf("after Shutdown began the client read %q, %v; want \"bye\" then EOF", rest, err)
	}
	<-done
}

// TestUpgradeHTTP2: Hijack fails for an HTTP/2 request, as in-process.
func TestUpgradeHTTP2(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := serveHTTP2(t, h)
	res, err := srv.Client().Get(srv.URL + "/h2")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.ProtoMajor != 2 || string(b) != "true" {
		t.Fatalf("over HTTP/%d, Hijack's error is ErrNotSupported: %s, want true over HTTP/2", res.ProtoMajor, b)
	}
}

// TestResponseControllerReadDeadline: SetReadDeadline works in the child,
// as in-process: a body read that waits past it fails with
// os.ErrDeadlineExceeded.
func TestResponseControllerReadDeadline(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	pr, pw := io.Pipe()
	defer pw.Close()
	res, err := srv.Client().Post(srv.URL+"/rdl", "text/plain", pr)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if string(b) != "true" {
		t.Fatalf("the body read after the read deadline: errors.Is(err, os.ErrDeadlineExceeded) = %s, want true", b)
	}
}

// TestResponseControllerWriteDeadline: SetWriteDeadline works in the
// child: a write that waits past it, the client reading nothing, fails
// with os.ErrDeadlineExceeded.
func TestResponseControllerWriteDeadline(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	res, err := srv.Client().Get(srv.URL + "/wdl")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close() // read nothing until the handler gave up
	waitFor(t, 30*time.Second, "the handler's write to fail", func() bool {
		res, err := srv.Client().Get(srv.URL + "/status")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(b) == "false false" {
			t.Fatal("the handler's write failed, but not with os.ErrDeadlineExceeded")
		}
		return string(b) == "true false"
	})
}

// TestUpgradeHalfClose: the handler's CloseWrite half-closes the client's
// connection (it reads EOF) while the handler goes on reading; its
// RemoteAddr is the client's as the parent saw it; after Close, reads and
// writes fail with net.ErrClosed.
func TestUpgradeHalfClose(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	conn, br, _ := upgDial(t, srv, "/half")
	got, err := io.ReadAll(br)
	if err != nil {
		t.Fatal(err)
	}
	if want := conn.LocalAddr().String() + "|true|" + srv.Listener.Addr().String() + "|hello"; string(got) != want {
		t.Fatalf("before the handler's CloseWrite the client read %q, want %q", got, want)
	}
	io.WriteString(conn, "abc")
	conn.(*net.TCPConn).CloseWrite()
	waitFor(t, 20*time.Second, "the handler to read the client's end", func() bool {
		res, err := srv.Client().Get(srv.URL + "/status")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if s := string(b); s != "none false" {
			if s != "3,<nil>,true,true false" {
				t.Fatalf("the handler read %s, want \"3,<nil>,true,true\" (bytes, error, Read and Write after Close fail with net.ErrClosed)", s)
			}
			return true
		}
		return false
	})
}

// switchProtocols hijacks w's connection and writes the 101 of upg-echo
// into it, as gorilla/websocket does.
func switchProtocols(w http.ResponseWriter) net.Conn {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: upg-echo\r\n\r\n")
	return conn
}

// hijackLate starts a response, flushes part of it, writes more, then
// hijacks the connection and writes raw bytes into it.
func hijackLate(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Late", "1")
	io.WriteString(w, "flushed ")
	w.(http.Flusher).Flush()
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		fmt.Fprintf(w, "Hijack: %v", err)
		return
	}
	defer conn.Close()
	brw.WriteString("raw bytes")
	brw.Flush()
}

// rawResponse sends a GET for path to addr and returns every byte the
// server sends until it closes the connection, its Date field removed.
func rawResponse(t *testing.T, addr, path string) string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n", path)
	b, err := io.ReadAll(conn)
	require.NoError(t, err)
	return regexp.MustCompile(`\r\nDate: [^\r]*`).ReplaceAllString(string(b), "")
}

// TestUpgradeHijackLate: a handler that hijacks after its response started
// (flushed) gets the connection, as in net/http: the client reads the same
// bytes as from the handler in-process, the started response and then the
// raw bytes.
func TestUpgradeHijackLate(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	local := httptest.NewServer(http.HandlerFunc(hijackLate))
	defer local.Close()
	want := rawResponse(t, local.Listener.Addr().String(), "/late")
	require.Contains(t, want, "raw bytes", "in-process, the hijack must work")
	assert.Equal(t, want, rawResponse(t, srv.Listener.Addr().String(), "/late"))
}

// TestUpgradeOutlivesRequestTimeout: RequestTimeout ends an upgraded
// request's context, as any request's, but not its connection, which goes
// on carrying bytes both ways.
func TestUpgradeOutlivesRequestTimeout(t *testing.T) {
	h := startModule(t, "upg", Options{RequestTimeout: 100 * time.Millisecond})
	srv := httptest.NewServer(h)
	defer srv.Close()
	conn, br, resp := upgDial(t, srv, "/outlive")
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	line, err := br.ReadString('\n')
	require.NoError(t, err)
	assert.Contains(t, line, "done: ")
	assert.Contains(t, line, "RequestTimeout")
	io.WriteString(conn, "still here")
	conn.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(br)
	require.NoError(t, err)
	assert.Equal(t, "still here", string(rest))
}

// TestLocalAddrReachesModule: the child's request has the parent's
// connection's local address under http.LocalAddrContextKey, as it would
// in-process, and a hijacked conn's LocalAddr is the same.
func TestLocalAddrReachesModule(t *testing.T) {
	h := startModule(t, "upg", Options{})
	srv := httptest.NewServer(h)
	defer srv.Close()
	for range 2 { // the second from the child's cache of it
		status, body := fetch(t, srv.URL+"/local")
		require.Equal(t, http.StatusOK, status)
		assert.Equal(t, srv.Listener.Addr().String(), body)
	}
}

// A tunnel the parent gives up before it read the hijack (the client went
// away, or the parent's own hijack failed) still ends as a tunnel: the
// child's half-close (kindEnd) and then its close (kindAbort) are dropped,
// and the child serves on. The parent used to forget such a stream as a
// plain response, drop the half-close as its end, and take the close for
// a message after the end: a protocol error, for which it killed the
// child and every request in flight on it.
func TestForgottenTunnelEndsAsTunnel(t *testing.T) {
	hijacked, closeIt := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	p := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/hijack" {
			io.WriteString(w, "ok")
			return
		}
		defer close(done)
		conn, _, err := http.NewResponseController(w).Hijack()
		if !assert.NoError(t, err, "Hijack") {
			return
		}
		close(hijacked)
		<-closeIt
		conn.(interface{ CloseWrite() error }).CloseWrite()
		conn.Close()
	}))
	r := httptest.NewRequest("GET", "/hijack", nil)
	head := newRequestHead(r)
	head.Hijackable, head.LocalAddr = true, "tcp 127.0.0.1:80"
	s, err := p.c.open(r, head)
	require.NoError(t, err)
	<-hijacked
	require.Eventually(t, s.tunneled, 10*time.Second, time.Millisecond, "the parent never read the hijack")
	giveUp(context.Background(), p.c, s)
	close(closeIt)
	<-done

	status, body := readAll(t, p.c, openRequest(t, p.c, httptest.NewRequest("GET", "/after", nil)))
	assert.Equal(t, http.StatusOK, status)
	assert.Equal(t, "ok", string(body))
	assert.True(t, p.c.usable(), "the child is no longer usable: %v", p.c.doneErr())
}

// A hijacked conn that its handler drops without closing it (it panicked,
// or returned and forgot it) is closed when the child's garbage collector
// finds it unreachable, as net/http's connection is when its file
// descriptor is collected: the client's connection closes, and the parent
// no longer holds the request (else it held its goroutine, the socket and
// a MaxInFlight place for as long as the child lived).
func TestUpgradeDroppedConnClosed(t *testing.T) {
	for _, path := range []string{"/drop-panic", "/drop-return"} {
		t.Run(path, func(t *testing.T) {
			h := startModule(t, "upg", Options{})
			srv := serve(t, h)
			conn, br, resp := upgDial(t, srv, path)
			require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
			awaitStats(t, h, 10*time.Second, "the tunnel in flight", func(st Stats) bool { return st.InFlight == 1 })
			code, body := fetch(t, srv.URL+"/gc")
			require.Equal(t, http.StatusOK, code, body)
			conn.SetReadDeadline(time.Now().Add(20 * time.Second))
			_, err := br.ReadByte()
			assert.ErrorIs(t, err, io.EOF, "the client's connection after its conn was collected in the child")
			awaitStats(t, h, 10*time.Second, "the tunnel's end", func(st Stats) bool { return st.InFlight == 0 })
		})
	}
}
