package subproc

// End-to-end tests of containment at the level of one request: a message
// too large for a frame fails its own request and nothing else, and a
// request the parent gives up costs it nothing more.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// containBig is a header value larger than a frame can carry.
var containBig = strings.Repeat("x", frame.MaxPayload+1)

func init() {
	Register("contain-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, os.Getpid())
		})
		// /big-head answers with a head too large for a frame; /last-error
		// then says what its write returned.
		mux.HandleFunc("/big-head", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Big", containBig)
			_, err := io.WriteString(w, "body")
			containLastError <- fmt.Sprint(err)
		})
		// /big-head-read answers with a head too large for a frame, then
		// reads its body; /last-error then says how the read ended.
		mux.HandleFunc("/big-head-read", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Big", containBig)
			w.(http.Flusher).Flush()
			_, err := io.Copy(io.Discard, r.Body)
			containLastError <- fmt.Sprint(err)
		})
		// /big-head-later is /big-head-read, but answers only once
		// /release is asked for, without reading its body before.
		mux.HandleFunc("/big-head-later", func(w http.ResponseWriter, r *http.Request) {
			<-containRelease
			w.Header().Set("X-Big", containBig)
			w.(http.Flusher).Flush()
			_, err := io.Copy(io.Discard, r.Body)
			containLastError <- fmt.Sprint(err)
		})
		mux.HandleFunc("/release", func(w http.ResponseWriter, r *http.Request) {
			containRelease <- struct{}{}
		})
		mux.HandleFunc("/big-trailer", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", "X-Big")
			io.WriteString(w, "partial")
			w.(http.Flusher).Flush()
			w.Header().Set("X-Big", containBig)
		})
		mux.HandleFunc("/big-1xx", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Link", containBig)
			w.WriteHeader(http.StatusEarlyHints)
			w.Header().Del("Link")
			io.WriteString(w, "after the hints")
		})
		mux.HandleFunc("/last-error", func(w http.ResponseWriter, r *http.Request) {
			select {
			case v := <-containLastError:
				io.WriteString(w, v)
			case <-time.After(10 * time.Second):
				io.WriteString(w, "/big-head did not write")
			}
		})
		// /ignore never returns, whatever its request's context says.
		mux.HandleFunc("/ignore", func(w http.ResponseWriter, r *http.Request) {
			select {}
		})
		return mux, nil
	})
}

// containLastError is, in the child, what /big-head's write returned.
var containLastError = make(chan string, 1)

// containRelease lets /big-head-later answer.
var containRelease = make(chan struct{})

// containPid fetches the pid of the child that serves url.
func containPid(t *testing.T, url string) string {
	t.Helper()
	code, body := fetch(t, url+"/pid")
	require.Equal(t, http.StatusOK, code, body)
	return body
}

// A request whose head is too large for a frame gets 431, alone: the child
// serves on, and other requests do not notice.
func TestContainOversizedRequestHead(t *testing.T) {
	h := startModule(t, "contain-mod", Options{HealthInterval: time.Hour})
	srv := httptest.NewUnstartedServer(h)
	srv.Config.MaxHeaderBytes = 2 * frame.MaxPayload
	srv.Start()
	t.Cleanup(srv.Close)
	pid := containPid(t, srv.URL)

	// Over the network, as a client sends it.
	req, err := http.NewRequest("GET", srv.URL+"/pid", nil)
	require.NoError(t, err)
	req.Header.Set("X-Big", containBig)
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, res.StatusCode)
	assert.Contains(t, string(body), `module "contain-mod"`)

	// From a middleware that adds the header, concurrently with
	// bystanders.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if i%2 == 0 {
				rec := httptest.NewRecorder()
				r := httptest.NewRequest("GET", "/pid", nil)
				r.Header.Set("X-Big", containBig)
				h.ServeHTTP(rec, r)
				assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, rec.Code)
				return
			}
			assert.Equal(t, pid, containPid(t, srv.URL))
		})
	}
	wg.Wait()
	assert.Equal(t, pid, containPid(t, srv.URL), "the child was replaced")
	assert.Zero(t, h.Stats().Restarts)
}

// A response whose head, 1xx head or trailers are too large for a frame
// fails alone: the handler's write reports it, the client gets 502 (or an
// abort once the response has started), and the child serves on.
func TestContainOversizedResponseHead(t *testing.T) {
	h := startModule(t, "contain-mod", Options{HealthInterval: time.Hour})
	srv := serve(t, h)
	pid := containPid(t, srv.URL)

	code, body := fetch(t, srv.URL+"/big-head")
	assert.Equal(t, http.StatusBadGateway, code)
	assert.Contains(t, body, `module "contain-mod"`)
	_, lastErr := fetch(t, srv.URL+"/last-error")
	assert.Contains(t, lastErr, "exceeds", "the handler's write should have failed")

	// The handler runs on after the 502: its body, which the client
	// never ends, fails, as for a client gone, instead of waiting for
	// ever.
	pr, pw := io.Pipe()
	defer pw.Close()
	res, err := http.Post(srv.URL+"/big-head-read", "text/plain", pr)
	require.NoError(t, err)
	res.Body.Close()
	assert.Equal(t, http.StatusBadGateway, res.StatusCode)
	_, lastErr = fetch(t, srv.URL+"/last-error")
	assert.Equal(t, errClientGone.Error(), lastErr, "the handler's read of its body")

	// The same when the parent's 502 finds its pump waiting for the
	// child's credit, not in a read that halt could interrupt, and the
	// client, which sent more than a window, sends no more for now: the
	// 502 is not held back for the rest of the body, as net/http would
	// hold it, to discard the rest, unless the connection closes after it.
	pr, pw = io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", srv.URL+"/big-head-later", pr)
	require.NoError(t, err)
	done := make(chan *http.Response, 1)
	go func() {
		res, err := srv.Client().Do(req)
		assert.NoError(t, err, "the 502 should come without the rest of the body")
		done <- res
	}()
	_, err = pw.Write(make([]byte, chunkSize+1))
	require.NoError(t, err)
	c := firstChild(h)
	require.Eventually(t, func() bool { return bodyPumpWaitsForCredit(c) }, 10*time.Second, time.Millisecond,
		"the body pump never waited for credit")
	fetch(t, srv.URL+"/release")
	if res := <-done; res != nil {
		res.Body.Close()
		assert.Equal(t, http.StatusBadGateway, res.StatusCode)
		assert.True(t, res.Close, "the connection should close after the 502")
	}
	pw.Close()
	_, lastErr = fetch(t, srv.URL+"/last-error")
	assert.Equal(t, errClientGone.Error(), lastErr, "the handler's read of its body")

	res, err = http.Get(srv.URL + "/big-trailer")
	require.NoError(t, err)
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	assert.Error(t, err, "a response whose trailers cannot be sent must be aborted (read %q)", b)

	code, body = fetch(t, srv.URL+"/big-1xx")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "after the hints", body)

	assert.Equal(t, pid, containPid(t, srv.URL), "the child was replaced")
	assert.Zero(t, h.Stats().Restarts)
}

// bodyPumpWaitsForCredit reports whether one of c's streams has a request
// body whose pump has spent its credit and waits for more.
func bodyPumpWaitsForCredit(c *child) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.pending {
		s.win.mu.Lock()
		waits := s.win.credit == 0 && s.win.wake != nil
		s.win.mu.Unlock()
		if waits {
			return true
		}
	}
	return false
}

// A Config too large for the child's first message fails Start at once.
func TestContainOversizedConfig(t *testing.T) {
	start := time.Now()
	h, err := Start(context.Background(), "contain-mod", Options{Config: make([]byte, frame.MaxPayload)})
	if h != nil {
		h.Close()
	}
	var se *StartError
	require.True(t, errors.As(err, &se), "Start: %v, want a *StartError", err)
	assert.Contains(t, err.Error(), "Options.Config")
	assert.Contains(t, err.Error(), fmt.Sprint(maxHeadSize-len("contain-mod")))
	assert.Less(t, time.Since(start), 5*time.Second, "Start should fail at once, not at StartTimeout")
}

// The parent releases a request it gives up, although the child's handler
// never returns.
func TestContainGivenUpRequestReleased(t *testing.T) {
	h := startModule(t, "contain-mod", Options{HealthInterval: time.Hour})
	srv := serve(t, h)
	const n = 200
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/ignore", nil)
		if res, err := http.DefaultClient.Do(req); err == nil {
			res.Body.Close()
		}
		cancel()
	}
	waitFor(t, 10*time.Second, "the requests to end in the parent", func() bool { return h.Stats().InFlight == 0 })
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	h.mu.Lock()
	c := h.newest
	h.mu.Unlock()
	c.mu.Lock()
	pending, forgotten := len(c.pending), len(c.forgotten)
	c.mu.Unlock()
	t.Logf("heap %+d bytes per given-up request; %d pending, %d forgotten", (int64(ms1.HeapAlloc)-int64(ms0.HeapAlloc))/n, pending, forgotten)
	assert.Zero(t, pending, "streams of given-up requests are still held")
	// A request whose client left before it reached the child is not
	// among them: the child never saw it.
	assert.LessOrEqual(t, forgotten, n)
	assert.Greater(t, forgotten, n/2)
}

// TestContainMaxBytesReaderInFront: http.MaxBytesHandler in front of a
// Handle, and bodies past its limit. When the parent's body pump crosses
// the limit, the MaxBytesReader writes "Connection: close" into the
// response's header map, from the pump's goroutine, while the exchange
// writes the module's head into the same map: without the guard this is a
// concurrent map write (a fatal error of the whole parent, which -race
// reports). The module answers at once, or echoes what it gets.
func TestContainMaxBytesReaderInFront(t *testing.T) {
	h := startModule(t, "bench", Options{})
	srv := httptest.NewServer(http.MaxBytesHandler(h, 4<<10))
	defer srv.Close()
	body := bytes.Repeat([]byte("m"), 256<<10)
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			path := "/small"
			if i%2 == 1 {
				path = "/echo"
			}
			res, err := srv.Client().Post(srv.URL+path, "application/octet-stream", bytes.NewReader(body))
			if err != nil {
				return // the server may close the connection before the upload ends
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			assert.Less(t, res.StatusCode, 500, "POST %s past the limit: %s", path, res.Status)
		})
	}
	wg.Wait()
	status, _ := fetch(t, srv.URL+"/small")
	assert.Equal(t, http.StatusOK, status, "the parent serves on")
}

// TestContainMaxBytesReaderStalledUpload: behind http.MaxBytesHandler, a
// client that stalls its upload keeps the body pump's read waiting, which
// the module's head waits for (see bodySender.guard). The request's
// deadline ends the wait: the request ends, counted as a timeout, instead
// of holding its exchange for as long as the client stalls.
func TestContainMaxBytesReaderStalledUpload(t *testing.T) {
	h := startModule(t, "tr-mux", Options{RequestTimeout: 300 * time.Millisecond})
	srv := httptest.NewServer(http.MaxBytesHandler(h, 1<<20))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	// One line of a body of 100,000 bytes, then nothing. The module's
	// /duplex answers at once, in full duplex.
	fmt.Fprintf(conn, "POST /duplex HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhello\n")
	awaitStats(t, h, 20*time.Second, "the request to end at its deadline", func(s Stats) bool {
		return s.Timeouts == 1 && s.InFlight == 0
	})
}

// A frozen child whose pipe is full holds no request whose client has
// gone: a request waiting to send its head, and one waiting to send the
// cancel of a request already sent, return as soon as their clients leave,
// not when a health check (here never) kills the child.
func TestFrozenFullPipeReleasesLeavingClients(t *testing.T) {
	h := startModule(t, "contain-mod", Options{HealthInterval: time.Hour})
	pid := h.Stats().Pid
	require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
	// Registered after startModule's cleanup, so run before it: Shutdown
	// need not wait for a frozen child.
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	waitFor(t, 10*time.Second, "the child to stop", func() bool { return procState(pid) == "T" })

	// Each POST's head, and the first window of its body, go to the pipe,
	// until it holds pipeSize and maxPending bytes more wait in the conn.
	c := firstChild(h)
	backedUp := func() bool {
		c.conn.mu.Lock()
		defer c.conn.mu.Unlock()
		return len(c.conn.pending) >= maxPending
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var served sync.WaitGroup
	serveOne := func(method string, body io.Reader) {
		served.Add(1)
		go func() {
			defer served.Done()
			r := httptest.NewRequestWithContext(ctx, method, "/pid", body)
			h.ServeHTTP(httptest.NewRecorder(), r)
		}()
	}
	posts := 0
	for ; !backedUp(); posts++ {
		require.Less(t, posts, 4*maxPipeSize/chunkSize, "the conn never backed up")
		serveOne(http.MethodPost, bytes.NewReader(make([]byte, chunkSize)))
		waitFor(t, 10*time.Second, "the POST to be in flight", func() bool { return h.Stats().InFlight == posts+1 })
	}
	serveOne(http.MethodGet, nil) // its head waits for room
	waitFor(t, 10*time.Second, "the GET to be in flight", func() bool { return h.Stats().InFlight == posts+1 })

	cancel()
	done := make(chan struct{})
	go func() {
		served.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		syscall.Kill(pid, syscall.SIGKILL) // lets the test end
		<-done
		t.Fatalf("%d POSTs and a GET to a frozen child with a full pipe were still in ServeHTTP 10s after their clients left", posts)
	}
}

// maxPipeSize bounds what a pipe of the protocol holds: on Linux the
// parent asks for pipeSize; other systems' pipes hold less.
const maxPipeSize = 1 << 20
