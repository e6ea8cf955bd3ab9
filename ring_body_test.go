//go:build linux

package subproc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The parent reads a request body into a slot of the down ring only when
// the body's reader is the server's own (serverBody). A middleware's
// reader may use all of p as scratch space, or read it back, and the
// child maps the slot: these tests are what a hostile module would see or
// change otherwise.

func init() {
	// slot-peeker is a hostile module that looks for given bytes in the
	// memory it shares with the parent, through /proc/self/mem. GET
	// /peek?m=<hex> answers "found" or "no"; POST /upload?m=<hex> answers
	// whether the body it was sent contains them, and its length.
	Register("slot-peeker", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /peek", func(w http.ResponseWriter, r *http.Request) {
			marker, err := hex.DecodeString(r.URL.Query().Get("m"))
			if err != nil || len(marker) == 0 {
				http.Error(w, "bad marker", http.StatusBadRequest)
				return
			}
			found, err := sharedMemoryHolds(marker)
			switch {
			case err != nil:
				http.Error(w, err.Error(), http.StatusInternalServerError)
			case found:
				fmt.Fprint(w, "found")
			default:
				fmt.Fprint(w, "no")
			}
		})
		mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
			marker, _ := hex.DecodeString(r.URL.Query().Get("m"))
			b, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fmt.Fprintf(w, "%v %d", bytes.Contains(b, marker), len(b))
		})
		return mux, nil
	})
}

// sharedMemoryHolds reports whether the memory this process shares with
// its parent holds marker.
func sharedMemoryHolds(marker []byte) (bool, error) {
	maps, err := sharedMappings()
	if err != nil {
		return false, err
	}
	if len(maps) == 0 {
		return false, fmt.Errorf("no shared mapping")
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		return false, err
	}
	defer mem.Close()
	for _, m := range maps {
		buf := make([]byte, m.end-m.start)
		if _, err := mem.ReadAt(buf, int64(m.start)); err != nil {
			return false, err
		}
		if bytes.Contains(buf, marker) {
			return true, nil
		}
	}
	return false, nil
}

// gatedReader is the server's reader of a body as a middleware's reader
// sees it, with a pause: after its first read that returns bytes, it
// closes reached and waits for gate before it returns. The bytes it read
// are then in the caller's p, before the caller does anything with them.
type gatedReader struct {
	r       io.Reader
	reached chan struct{}
	gate    <-chan struct{}
	paused  bool
}

func (g *gatedReader) Read(p []byte) (int, error) {
	n, err := g.r.Read(p)
	if n > 0 && !g.paused {
		g.paused = true
		close(g.reached)
		<-g.gate
	}
	return n, err
}

// A parent middleware that encrypts request bodies before a module sees
// them, with a reader that works in place (crypto/cipher.StreamReader
// XORs p after its inner read): the plaintext is in p between the two,
// and p must not be memory the child can read.
func TestRingWrappedBodyScratchUnshared(t *testing.T) {
	h := startModule(t, "slot-peeker", Options{})
	require.NotNil(t, firstChild(h).sendRing, "the child has no down ring")

	marker := make([]byte, 32)
	rand.Read(marker)
	key := make([]byte, 32)
	rand.Read(key)
	block, err := aes.NewCipher(key)
	require.NoError(t, err)
	reached, gate := make(chan struct{}), make(chan struct{})
	var openGate sync.Once
	t.Cleanup(func() { openGate.Do(func() { close(gate) }) })

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			inner := &gatedReader{r: r.Body, reached: reached, gate: gate}
			r.Body = struct {
				io.Reader
				io.Closer
			}{cipher.StreamReader{S: cipher.NewCTR(block, make([]byte, aes.BlockSize)), R: inner}, r.Body}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	plain := bytes.Repeat(marker, (256<<10)/len(marker))
	m := hex.EncodeToString(marker)
	answer := make(chan string, 1)
	go func() {
		res, err := http.Post(srv.URL+"/upload?m="+m, "application/octet-stream", bytes.NewReader(plain))
		if err != nil {
			answer <- err.Error()
			return
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		answer <- string(b)
	}()

	select {
	case <-reached:
	case <-time.After(20 * time.Second):
		t.Fatal("the parent never read the upload")
	}
	_, seen := fetch(t, srv.URL+"/peek?m="+m) // while the plaintext is in p
	openGate.Do(func() { close(gate) })
	assert.Equal(t, fmt.Sprintf("false %d", len(plain)), <-answer, "the module's body: the ciphertext, whole")
	assert.Equal(t, "no", seen, "the module found the plaintext of an encrypted upload in the memory it shares with the parent")
}

// A parent middleware that reads a body back after each read (a tee to an
// audit log or a checksum) sees what the client sent, even while the
// child scribbles over all the memory it shares with the parent.
func TestRingWrappedBodyReadBack(t *testing.T) {
	sent := bytes.Repeat(ringPattern(chunkSize), 64)
	var (
		mu          sync.Mutex
		teed, wrong int
	)
	srv := scribbling(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && r.URL.Path == "/upload" {
				var seen bytes.Buffer
				r.Body = struct {
					io.Reader
					io.Closer
				}{io.TeeReader(r.Body, &seen), r.Body}
				defer func() {
					mu.Lock()
					defer mu.Unlock()
					teed += seen.Len()
					if !bytes.Equal(seen.Bytes(), sent[:seen.Len()]) {
						wrong++
					}
				}()
			}
			h.ServeHTTP(w, r)
		})
	})
	for range 8 {
		res, err := http.Post(srv.URL+"/upload", "application/octet-stream", bytes.NewReader(sent))
		if err == nil { // (the scribbled states may cost the child its life)
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}
	mu.Lock()
	defer mu.Unlock()
	require.Positive(t, teed, "the middleware read nothing")
	assert.Zero(t, wrong, "uploads that the parent's own middleware read otherwise than the client sent them (of %d bytes teed)", teed)
}

// Behind a parent's http.MaxBytesReader, whose read asks its reader for
// one byte more than the limit lets through, to see whether the body goes
// past it, no byte past the limit lands in memory the child maps: the
// module sees the body cut at the limit, and nothing of what follows.
func TestRingMaxBytesReaderLimitUnshared(t *testing.T) {
	h := startModule(t, "slot-peeker", Options{})
	require.NotNil(t, firstChild(h).sendRing, "the child has no down ring")
	const limit = 24 << 10
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, limit)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	body := make([]byte, limit+4<<10)
	rand.Read(body)
	within := hex.EncodeToString(body[limit-16 : limit])
	past := hex.EncodeToString(body[limit-15 : limit+1]) // its last byte is past the limit
	// The request in one write, which a loopback connection delivers
	// whole: after the bytes that net/http reads with the head, the next
	// read of the body finds all the rest, and asks for what the limit
	// lets through, plus one.
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	req := fmt.Appendf(nil, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", len(body))
	_, err = conn.Write(append(req, body...))
	require.NoError(t, err)
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	answer, _ := io.ReadAll(res.Body)
	res.Body.Close()
	assert.Equal(t, http.StatusBadRequest, res.StatusCode)
	assert.Contains(t, string(answer), "too large", "the module's read of its body")

	_, seen := fetch(t, srv.URL+"/peek?m="+within)
	require.Equal(t, "found", seen, "the body's last bytes within the limit were not read into a slot: the test shows nothing")
	_, seen = fetch(t, srv.URL+"/peek?m="+past)
	assert.Equal(t, "no", seen, "the byte past the limit is in memory the child maps")
}

// snapshotWriter is a parent middleware's ResponseWriter that looks at
// what it is given, as one that compresses or hashes a body would: it
// counts the writes whose bytes changed while it held them.
type snapshotWriter struct {
	http.ResponseWriter
	changed *atomic.Int32
}

func (w snapshotWriter) Write(p []byte) (int, error) {
	return snapshotWrite(w.ResponseWriter.Write, p, w.changed)
}

// snapshotWrite returns write(p), and counts in changed a p whose bytes
// changed during the call.
func snapshotWrite(write func([]byte) (int, error), p []byte, changed *atomic.Int32) (int, error) {
	snap := bytes.Clone(p)
	n, err := write(p)
	if !bytes.Equal(snap, p) {
		changed.Add(1)
	}
	return n, err
}

func (w snapshotWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	return snapshotConn{conn, w.changed}, brw, nil
}

// snapshotConn is snapshotWriter's hijacked connection, a middleware's
// wrapper of the server's.
type snapshotConn struct {
	net.Conn
	changed *atomic.Int32
}

func (c snapshotConn) Write(p []byte) (int, error) {
	return snapshotWrite(c.Conn.Write, p, c.changed)
}

// scribbling starts ring-attacker's scribble over the memory its child
// shares with the parent, behind a server whose handler is wrap(h), and
// returns the server.
func scribbling(t *testing.T, wrap func(http.Handler) http.Handler) *httptest.Server {
	t.Helper()
	h := startModule(t, "ring-attacker", Options{})
	require.NotNil(t, firstChild(h).ring, "the child has no up ring")
	require.NotNil(t, firstChild(h).sendRing, "the child has no down ring")
	srv := httptest.NewServer(wrap(h))
	t.Cleanup(srv.Close)
	res, err := http.Post(srv.URL+"/scribble", "", nil)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	t.Cleanup(func() {
		if res, err := http.Post(srv.URL+"/stop", "", nil); err == nil {
			res.Body.Close()
		}
	})
	return srv
}

// A parent middleware's ResponseWriter, or its wrapper of a hijacked
// connection, that looks at the bytes it is given sees them stay as they
// were while it holds them, however the child scribbles over the memory it
// shares with the parent: it gets a private copy of an up ring's slot,
// which the server's own writer and connection need not.
func TestRingWrappedWriterSeesWhatItSends(t *testing.T) {
	for _, tc := range []struct {
		name    string
		receive func(url, addr string) int // bytes received, 4 MiB sent
	}{
		{"response", func(url, _ string) int {
			res, err := http.Get(url + "/big?bytes=" + strconv.Itoa(4<<20))
			if err != nil { // (the scribbled states may cost the child its life)
				return 0
			}
			defer res.Body.Close()
			n, _ := io.Copy(io.Discard, res.Body)
			return int(n)
		}},
		{"tunnel", func(_, addr string) int {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				return 0
			}
			defer conn.Close()
			fmt.Fprintf(conn, "GET /tunnel?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bytes\r\n\r\n", 4<<20)
			n, _ := io.Copy(io.Discard, conn)
			return int(n)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var changed atomic.Int32
			srv := scribbling(t, func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					h.ServeHTTP(snapshotWriter{w, &changed}, r)
				})
			})
			got := 0
			for range 8 {
				got += tc.receive(srv.URL, srv.Listener.Addr().String())
			}
			require.Positive(t, got, "nothing got through")
			assert.Zero(t, changed.Load(), "writes whose bytes changed while the middleware held them (of %d bytes received)", got)
		})
	}
}

// wrapListener is a user's listener (proxy protocol, accounting, a
// byte logger) whose conns are a user's net.Conn around the TCP socket.
type wrapListener struct {
	net.Listener
	wrap func(net.Conn) net.Conn
}

func (l wrapListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.wrap(c), nil
}

// ringSpyConn counts the Reads and Writes whose p is ring memory.
type ringSpyConn struct {
	net.Conn
	rings         []*bodyRing
	reads, writes *atomic.Int32
	changed       *atomic.Int32
}

func (c *ringSpyConn) Read(p []byte) (int, error) {
	if inRing(p, c.rings...) {
		c.reads.Add(1)
	}
	return c.Conn.Read(p)
}

func (c *ringSpyConn) Write(p []byte) (int, error) {
	if inRing(p, c.rings...) {
		c.writes.Add(1)
	}
	return snapshotWrite(c.Conn.Write, p, c.changed)
}

// An HTTP/1 server on a user's listener, whose connections are the user's:
// net/http's own ResponseWriter writes a large body straight to the
// connection, and its own body reads straight from it, so neither may be
// handed slot memory (serverConn). (TLS and HTTP/2 copy into buffers of
// their own.)
func TestRingListenerConnGetsNoSlots(t *testing.T) {
	h := startModule(t, "ring-attacker", Options{})
	c := firstChild(h)
	require.NotNil(t, c.ring)
	require.NotNil(t, c.sendRing)
	var reads, writes, changed atomic.Int32 // (changed is snapshotWrite's)
	srv := httptest.NewUnstartedServer(h)
	srv.Listener = wrapListener{srv.Listener, func(nc net.Conn) net.Conn {
		return &ringSpyConn{nc, []*bodyRing{c.ring, c.sendRing}, &reads, &writes, &changed}
	}}
	srv.Start()
	t.Cleanup(srv.Close)

	// Download: up-ring slots written to the user's conn.
	res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(4<<20))
	require.NoError(t, err)
	n, _ := io.Copy(io.Discard, res.Body)
	res.Body.Close()
	require.EqualValues(t, 4<<20, n)

	// Upload: the user's conn reads into down-ring slots.
	sent := bytes.Repeat(ringPattern(chunkSize), 64)
	res, err = http.Post(srv.URL+"/upload", "application/octet-stream", bytes.NewReader(sent))
	require.NoError(t, err)
	io.Copy(io.Discard, res.Body)
	res.Body.Close()

	assert.Zero(t, writes.Load(), "writes of up-ring slot memory to the listener's connection, which is user code")
	assert.Zero(t, reads.Load(), "reads by the listener's connection, which is user code, into down-ring slots")
}

// writeData hands a slot's bytes as they are to net/http's own writer over
// a socket (TestSniffedBytesAreCopied checks what directWriter does), and
// copies them for a middleware's writer; the client gets the same body
// either way.
func TestWriteDataDirectOnlyToServerWriter(t *testing.T) {
	want := ringPattern(40 << 10)
	for _, tc := range []struct {
		name   string
		wrap   func(http.ResponseWriter) http.ResponseWriter
		direct bool
	}{
		{"net/http's", func(w http.ResponseWriter) http.ResponseWriter { return w }, true},
		{"a middleware's", func(w http.ResponseWriter) http.ResponseWriter { return unwrapWriter{w} }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			direct := make(chan bool, 1)
			srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				c, s, ev := slotDataEvent(t, want)
				x := &exchange{w: tc.wrap(w), ctx: r.Context(), c: c, s: s}
				require.True(t, x.writeData(ev))
				assert.Zero(t, heldSlots(c.ring), "the slot was not freed")
				direct <- x.directWriter
			}))
			status, body := fetch(t, srv.URL)
			require.Equal(t, http.StatusOK, status)
			assert.Equal(t, string(want), body)
			assert.Equal(t, tc.direct, <-direct, "written from the slot")
		})
	}
}

// serverWriter and plainConn know the server's own ResponseWriters (HTTP/1
// and HTTP/2) and connections, and nothing else.
func TestServerWriter(t *testing.T) {
	got := make(chan bool, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- serverWriter(w)
	})
	h1, h2 := serve(t, handler), serveHTTP2(t, handler)
	for _, srv := range []*httptest.Server{h1, h2} {
		res, err := srv.Client().Get(srv.URL)
		require.NoError(t, err)
		res.Body.Close()
		assert.True(t, <-got, "net/http's writer, HTTP/%d", res.ProtoMajor)
	}

	// Behind a middleware's writer, the server's own is found through
	// Unwrap (for the body's reads), but the middleware's gets no slot.
	type wrapped struct{ http.ResponseWriter }
	conns := make(chan [2]bool, 1)
	mw := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok, own := serverConn(w)
		hiddenOK, _ := serverConn(wrapped{w})
		viaOK, viaOwn := serverConn(unwrapWriter{w})
		assert.Equal(t, [2]bool{true, true}, [2]bool{ok, own}, "net/http's writer")
		assert.False(t, hiddenOK, "behind a writer without Unwrap")
		assert.Equal(t, [2]bool{true, false}, [2]bool{viaOK, viaOwn}, "behind a writer with Unwrap")
		conns <- [2]bool{serverWriter(unwrapWriter{w}), serverWriter(wrapped{w})}
	}))
	_, _ = fetch(t, mw.URL)
	assert.Equal(t, [2]bool{false, false}, <-conns, "middlewares' writers get no slot")
	assert.False(t, serverWriter(httptest.NewRecorder()))
	assert.False(t, serverWriter(snapshotWriter{}))
	assert.False(t, serverWriter(nil))

	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	assert.False(t, plainConn(a), "a pipe")
	assert.False(t, plainConn(snapshotConn{}), "a middleware's conn")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	assert.True(t, plainConn(c), "TCP")
	assert.True(t, plainConn(tls.Client(c, &tls.Config{})), "TLS over TCP")
}

// serverBody knows the server's readers of a request body, over HTTP/1,
// with Expect: 100-continue, over HTTP/2 and behind http.MaxBytesReader,
// and nothing else, and what MaxBytesReaders let through. Were a Go
// release to rename them, the parent would copy every body once more, or
// read past a limit into a slot, and this test would say so.
func TestServerBody(t *testing.T) {
	got := make(chan [2]bool, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		own, unlimited := serverBody(r.Body)
		inner := http.MaxBytesReader(w, r.Body, 1<<20)
		limited, left := serverBody(http.MaxBytesReader(w, inner, 2<<20))
		got <- [2]bool{own && unlimited == -1, limited && left == 1<<20}
		io.Copy(io.Discard, r.Body)
	})
	h1, h2 := serve(t, handler), serveHTTP2(t, handler)

	for _, tc := range []struct {
		name   string
		srv    *httptest.Server
		expect bool
		length int64 // -1: chunked
	}{
		{"HTTP/1", h1, false, 5},
		{"HTTP/1 chunked", h1, false, -1},
		{"HTTP/1 Expect", h1, true, 5},
		{"HTTP/2", h2, false, 5},
		{"HTTP/2 Expect", h2, true, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest("POST", tc.srv.URL, io.NopCloser(strings.NewReader("hello")))
			require.NoError(t, err)
			req.ContentLength = tc.length
			if tc.expect {
				req.Header.Set("Expect", "100-continue")
			}
			res, err := tc.srv.Client().Do(req)
			require.NoError(t, err)
			res.Body.Close()
			assert.Equal(t, [2]bool{true, true}, <-got, "the server's body, and behind MaxBytesReaders, the least they let through")
		})
	}

	own := func(body io.ReadCloser) bool {
		own, _ := serverBody(body)
		return own
	}
	wrapped := struct {
		io.Reader
		io.Closer
	}{strings.NewReader("x"), io.NopCloser(nil)}
	assert.False(t, own(wrapped), "a middleware's reader")
	assert.False(t, own(http.MaxBytesReader(httptest.NewRecorder(), wrapped, 10)), "MaxBytesReader over a middleware's reader")
	assert.False(t, own(http.NoBody))
	assert.False(t, own(nil))
	var nilBody *struct{ io.ReadCloser }
	assert.False(t, own(nilBody))
}
