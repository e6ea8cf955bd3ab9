package subproc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("ring", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /big", bigHandler)
		// /upload answers the SHA-256 of the request body; with
		// ?wait, it answers 204 without reading the body once /release
		// says so. /uploaded answers how many body bytes /upload has
		// read in all.
		release := make(chan struct{})
		var uploaded atomic.Int64
		mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Query().Has("wait") {
				select {
				case <-release:
					w.WriteHeader(http.StatusNoContent)
				case <-r.Context().Done():
				}
				return
			}
			h := sha256.New()
			if _, err := io.Copy(io.MultiWriter(h, countWriter{&uploaded}), r.Body); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fmt.Fprintf(w, "%x", h.Sum(nil))
		})
		mux.HandleFunc("GET /uploaded", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, uploaded.Load())
		})
		mux.HandleFunc("POST /release", func(w http.ResponseWriter, r *http.Request) {
			release <- struct{}{}
		})
		// /sniff sends a large first write of HTML and no Content-Type,
		// which net/http sniffs.
		mux.HandleFunc("GET /sniff", func(w http.ResponseWriter, r *http.Request) {
			w.Write(append([]byte("<!DOCTYPE html><html><body>"), bytes.Repeat([]byte("x"), 32<<10)...))
		})
		return mux, nil
	})
}

// A countWriter adds the length of each write to n.
type countWriter struct{ n *atomic.Int64 }

func (w countWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}

// ringPattern returns n bytes of a pattern that shows a misplaced chunk:
// byte i is i mod 251, and chunks are of 64 KiB, not a multiple of 251.
func ringPattern(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i % 251)
	}
	return p
}

// startRingModule starts module ring behind a test server, and returns the
// server and the child, which has rings; it skips the test where children
// get none.
func startRingModule(t *testing.T) (*httptest.Server, *child) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("only Linux children get rings")
	}
	h := startModule(t, "ring", Options{})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	c := firstChild(h)
	require.NotNil(t, c.ring, "the child has no up ring")
	require.NotNil(t, c.sendRing, "the child has no down ring")
	return srv, c
}

// inTurnAndAtOnce calls f 4 times in turn, then 8 times at once, and fails
// the test if any call fails.
func inTurnAndAtOnce(t *testing.T, f func() error) {
	t.Helper()
	for range 4 {
		require.NoError(t, f())
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- f() })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}

// bigHandler sends bytes= bytes of ringPattern in flushed writes of 64 KiB.
func bigHandler(w http.ResponseWriter, r *http.Request) {
	n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
	w.Header().Set("Content-Type", "application/octet-stream")
	p := ringPattern(chunkSize)
	for off := 0; off < n; off += len(p) {
		if _, err := w.Write(p[:min(len(p), n-off)]); err != nil {
			return
		}
		w.(http.Flusher).Flush()
	}
}

// heldSlots returns how many slots of r the parent holds.
func heldSlots(r *bodyRing) int {
	n := 0
	for i := range r.held {
		if r.held[i].Load() {
			n++
		}
	}
	return n
}

// The child takes only free slots, and none once the parent holds them all;
// the parent holds a slot once, and the child may take it again once the
// parent frees it.
func TestBodyRing(t *testing.T) {
	r := newLocalRing()
	taken := map[int]bool{}
	for range ringSlots {
		i := r.take()
		require.GreaterOrEqual(t, i, 0, "no slot free after %d taken", len(taken))
		require.False(t, taken[i], "slot %d taken twice", i)
		taken[i] = true
		require.True(t, r.hold(uint32(i)), "the parent refuses slot %d, handed over once", i)
	}
	require.Equal(t, -1, r.take(), "a slot taken with all of them held by the parent")
	require.False(t, r.hold(3), "the parent holds slot 3 twice")
	require.False(t, r.hold(ringSlots), "the parent holds a slot past the last")
	require.False(t, r.hold(1<<32-1), "the parent holds slot 2³²-1")

	r.free(5)
	require.Equal(t, 5, r.take(), "the slot the parent freed is not taken again")
	require.True(t, r.hold(5), "the parent refuses slot 5, freed and handed over again")

	// The slots do not overlap and are of a chunk each.
	for i := range ringSlots {
		s := r.slot(i)
		require.Len(t, s, chunkSize)
		s[0], s[len(s)-1] = byte(i), byte(i)
	}
	for i := range ringSlots {
		s := r.slot(i)
		require.Equal(t, []byte{byte(i), byte(i)}, []byte{s[0], s[len(s)-1]}, "slot %d was overwritten by another", i)
	}
}

// A chunk that a child hands over in a slot arrives with the slot's bytes;
// releasing it frees the slot for the child.
func TestReadLoopRingChunk(t *testing.T) {
	want := []byte("bytes in shared memory")
	input := frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 200}}, refFrame(1, 5, uint32(len(want))), outFrame{kind: kindEnd, id: 1})
	c := testChild(input)
	copy(c.ring.slot(5), want)
	c.ring.state[5].Store(ringTaken)
	c.nextID = 1
	s := newStream(1, window)
	c.pending[1] = s
	require.ErrorIs(t, c.readFrames(), io.EOF)

	ev, err := s.next(nil)
	require.NoError(t, err)
	require.Equal(t, kindResponse, ev.kind)
	ev, err = s.next(nil)
	require.NoError(t, err)
	require.Equal(t, kindData, ev.kind)
	require.Equal(t, want, ev.data())
	require.Equal(t, 1, heldSlots(c.ring), "the parent does not hold the chunk's slot")
	ev.release()
	require.Equal(t, 0, heldSlots(c.ring), "the parent holds the slot it released")
	require.Equal(t, uint32(ringFree), c.ring.state[5].Load(), "the released slot is not free for the child")
}

// A child that was given no ring cannot hand over a slot.
func TestReadLoopRingChunkWithoutRing(t *testing.T) {
	c := testChild(frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 200}}, refFrame(1, 0, 1)))
	c.ring = nil
	c.nextID = 1
	c.pending[1] = newStream(1, window)
	var pe *protocolError
	require.ErrorAs(t, c.readFrames(), &pe)
}

// The child puts a chunk of ringMin bytes or more in a free slot, and a
// smaller one, or any once the parent holds every slot, in the pipe.
func TestSendThroughRing(t *testing.T) {
	var out bytes.Buffer
	c := newConn(nil, nopWriteCloser{&out})
	c.sendRing = newLocalRing()
	big, small := ringPattern(ringMin), ringPattern(ringMin-1)
	fr := frame.NewReader(&out, 1<<20)
	preamble := true
	send := func(data []byte) (kind uint8, payload []byte) {
		t.Helper()
		require.NoError(t, c.send(outFrame{kind: kindData, id: 7, data: data}, nil))
		if preamble {
			require.NoError(t, frame.ReadPreamble(fr.Buffered(), protocolVersion))
			preamble = false
		}
		hdr, err := fr.ReadHeader()
		require.NoError(t, err)
		require.Equal(t, uint64(7), hdr.ID)
		payload = make([]byte, hdr.Len)
		require.NoError(t, fr.ReadPayload(payload))
		return hdr.Kind, payload
	}

	kind, payload := send(small)
	require.Equal(t, kindData, kind, "a chunk under ringMin did not go through the pipe")
	require.Equal(t, small, payload)

	for range ringSlots {
		kind, payload = send(big)
		require.Equal(t, kindDataRef, kind, "a chunk of ringMin bytes did not go through the ring")
		slot, n := binary.BigEndian.Uint32(payload[:4]), binary.BigEndian.Uint32(payload[4:])
		require.True(t, c.sendRing.hold(slot), "the child named slot %d, which it had named before", slot)
		require.Equal(t, big, c.sendRing.slot(int(slot))[:n])
	}
	kind, payload = send(big)
	require.Equal(t, kindData, kind, "with every slot held, a chunk did not go through the pipe")
	require.Equal(t, big, payload)

	c.sendRing.free(9)
	kind, payload = send(big)
	require.Equal(t, kindDataRef, kind, "a freed slot was not used")
	require.Equal(t, uint32(9), binary.BigEndian.Uint32(payload[:4]))
}

// Through a real child, large chunks go through the ring and arrive
// intact and in order, concurrently and one after another; net/http
// sniffs the type of a body whose first chunk went through it; and every
// slot comes back, from responses that completed and from those whose
// client went away.
func TestRingSlotsComeBack(t *testing.T) {
	srv, c := startRingModule(t)
	ring := c.ring

	const size = 4<<20 + 123
	want := make([]byte, 0, size)
	for len(want) < size {
		want = append(want, ringPattern(min(chunkSize, size-len(want)))...)
	}
	get := func() error {
		res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(size))
		if err != nil {
			return err
		}
		defer res.Body.Close()
		body, err := io.ReadAll(res.Body)
		if err != nil {
			return err
		}
		if !bytes.Equal(body, want) {
			return fmt.Errorf("body of %d bytes differs from the %d sent", len(body), len(want))
		}
		return nil
	}
	inTurnAndAtOnce(t, get)

	res, err := http.Get(srv.URL + "/sniff")
	require.NoError(t, err)
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	require.Equal(t, "text/html; charset=utf-8", res.Header.Get("Content-Type"))

	// A client that stops reading leaves its chunks queued in the parent,
	// in slots; when it goes away they come back.
	for range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/big?bytes="+strconv.Itoa(1<<30), nil)
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		_, err = io.ReadFull(res.Body, make([]byte, 1<<20))
		require.NoError(t, err)
		require.Eventually(t, func() bool { return heldSlots(ring) > 0 }, 10*time.Second, time.Millisecond, "no chunk of a stalled response is held in a slot")
		cancel()
		_, err = io.Copy(io.Discard, res.Body)
		require.True(t, errors.Is(err, context.Canceled), "reading a canceled response: %v", err)
		res.Body.Close()
	}
	// Chunks the child sent before it saw the cancel are dropped as they
	// come: once none is held or in flight, every slot is free.
	assert.Eventually(t, func() bool { return heldSlots(ring) == 0 && takenSlots(ring) == 0 }, 10*time.Second, time.Millisecond,
		"%d slots held, %d taken, with no response in flight", heldSlots(ring), takenSlots(ring))
	require.NoError(t, get(), "after the slots came back")
}

// takenSlots returns how many slots of r the sender has taken and the
// receiver has not freed.
func takenSlots(r *bodyRing) int {
	n := 0
	for i := range r.state {
		if r.state[i].Load() != ringFree {
			n++
		}
	}
	return n
}

// Request bodies go to a real child through its down ring, intact,
// concurrently and one after another; the child frees every slot, from
// bodies it read and from those of requests canceled before it read them.
func TestDownRingSlotsComeBack(t *testing.T) {
	srv, c := startRingModule(t)
	ring := c.sendRing

	body := bytes.Repeat(ringPattern(chunkSize), 64)
	body = append(body, ringPattern(12345)...)
	want := fmt.Sprintf("%x", sha256.Sum256(body))
	post := func() error {
		res, err := http.Post(srv.URL+"/upload", "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			return err
		}
		defer res.Body.Close()
		got, err := io.ReadAll(res.Body)
		if err != nil {
			return err
		}
		if res.StatusCode != http.StatusOK || string(got) != want {
			return fmt.Errorf("%s: %q, want the body's hash %s", res.Status, got, want)
		}
		return nil
	}
	inTurnAndAtOnce(t, post)
	require.Equal(t, 0, takenSlots(ring), "slots not freed after every body was read")

	// A body the handler has not read stays in the child, in slots, until
	// the handler returns.
	for range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, "POST", srv.URL+"/upload?wait", io.MultiReader(bytes.NewReader(body), untilDone{ctx}))
		done := make(chan int, 1)
		go func() {
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				done <- 0
				return
			}
			res.Body.Close()
			done <- res.StatusCode
		}()
		require.Eventually(t, func() bool { return takenSlots(ring) > 0 }, 10*time.Second, time.Millisecond, "no chunk of an unread body is in a slot")
		res, err := http.Post(srv.URL+"/release", "", nil)
		require.NoError(t, err)
		res.Body.Close()
		require.Equal(t, http.StatusNoContent, <-done)
		cancel()
	}
	assert.Eventually(t, func() bool { return takenSlots(ring) == 0 }, 10*time.Second, time.Millisecond, "%d slots taken with no request in flight", takenSlots(ring))
	require.NoError(t, post(), "after the slots came back")
}

// The parent reads a request body from the client straight into a slot
// of the down ring, but reads that wait for clients hold at most
// maxReadSlots slots: uploads that stall after a fast start cannot take the
// ring from the other requests.
func TestStalledUploadsLeaveTheRing(t *testing.T) {
	srv, c := startRingModule(t)
	ring := c.sendRing

	// Each stalled upload sends stallBytes at once, which the handler reads
	// (its slots come back), and then nothing: the parent's next read,
	// with room for a slot's worth, waits in a slot, or, once
	// maxReadSlots reads wait in slots, in a buffer of its own.
	const stalled = ringSlots + 4
	statuses, cancel := stallUploads(t, srv, c, stalled)
	require.Never(t, func() bool { return c.conn.readSlots.Load() > maxReadSlots || takenSlots(ring) > maxReadSlots }, 200*time.Millisecond, time.Millisecond,
		"more than %d slots held while %d uploads stall", maxReadSlots, stalled)

	// The other requests still have the rest of the ring.
	uploadWhole(t, srv)

	cancel()
	for range stalled {
		<-statuses
	}
	assert.Eventually(t, func() bool { return takenSlots(ring) == 0 && c.conn.readSlots.Load() == 0 }, 10*time.Second, time.Millisecond,
		"%d slots taken, %d reads in slots, once the stalled uploads have gone", takenSlots(ring), c.conn.readSlots.Load())
}

// A child killed while the parent's reads of stalled uploads wait in its
// down ring's slots: each read is cut, its slot given back to the dead
// ring (still mapped while a read may write to it), each request answered
// 502 while its client still has not sent the rest, and the next child
// serves an upload whole.
func TestStalledUploadsChildKilled(t *testing.T) {
	srv, c := startRingModule(t)
	ring := c.sendRing

	const stalled = ringSlots + 4
	statuses, _ := stallUploads(t, srv, c, stalled) // the test's cleanup ends them

	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	// The clients still send nothing: what ends their requests is the
	// child's death.
	for range stalled {
		select {
		case code := <-statuses:
			assert.Equal(t, http.StatusBadGateway, code, "a stalled upload whose child was killed")
		case <-time.After(20 * time.Second):
			t.Fatalf("a stalled upload still waits, 20 s after its child was killed (%d reads in slots)", c.conn.readSlots.Load())
		}
	}
	assert.Zero(t, c.conn.readSlots.Load(), "reads of the dead child's uploads still in slots")
	assert.Eventually(t, func() bool { return takenSlots(ring) == 0 }, 10*time.Second, time.Millisecond,
		"%d slots of the dead child's down ring taken", takenSlots(ring))

	uploadWhole(t, srv) // on the next child
}

// stallBytes is what a stalled upload sends first: two HTTP/2 frames of
// 16 KiB, so that over HTTP/2 too no read of it returns less than ringMin,
// which would mark the client slow and keep its next read out of the slots
// (see bodySender.slow), and less than the stream's first window by more
// than ringMin, so that the next read has the credit to wait in a slot.
// (With 40 KiB, whose last frame is 8 KiB, TestStalledUploadsHTTP2ChildKilled
// failed about once in 4 full runs.)
const stallBytes = 32 << 10

// stallUploads starts n uploads to the ring module's /upload on child c
// that each send stallBytes and then nothing until cancel is called. It
// returns once their handlers have read those (every request is c's,
// and none could be retried on another child) and the cap's worth of the
// parent's reads waits in slots of c's down ring. Each upload sends its
// response's status to the channel, or -1 if it got none. The test's
// cleanup calls cancel too.
func stallUploads(t *testing.T, srv *httptest.Server, c *child, n int) (statuses <-chan int, cancel func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	// A first request, so that over HTTP/2 the uploads start on a
	// connection whose window the server has widened (to 1 MiB): in the
	// first 64 KiB, the client cuts a frame at the window's edge, and a
	// read of one, shorter than ringMin, takes the client for slow.
	res, err := srv.Client().Get(srv.URL + "/uploaded")
	require.NoError(t, err)
	res.Body.Close()
	ch := make(chan int, n)
	for range n {
		req, err := http.NewRequestWithContext(ctx, "POST", srv.URL+"/upload", io.MultiReader(bytes.NewReader(ringPattern(stallBytes)), untilDone{ctx}))
		require.NoError(t, err)
		go func() {
			res, err := srv.Client().Do(req)
			if err != nil {
				ch <- -1
				return
			}
			res.Body.Close()
			ch <- res.StatusCode
		}()
	}
	uploaded := func() int {
		res, err := srv.Client().Get(srv.URL + "/uploaded")
		if err != nil {
			return -1
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		n, _ := strconv.Atoi(string(b))
		return n
	}
	require.Eventually(t, func() bool { return uploaded() == n*stallBytes }, 20*time.Second, 5*time.Millisecond,
		"the handlers read %d bytes of the stalled uploads, want %d", uploaded(), n*stallBytes)
	ring := c.sendRing
	require.Eventually(t, func() bool { return c.conn.readSlots.Load() == maxReadSlots && takenSlots(ring) == maxReadSlots }, 10*time.Second, time.Millisecond,
		"%d reads wait in slots and %d slots are taken, want %d (the cap) of each", c.conn.readSlots.Load(), takenSlots(ring), maxReadSlots)
	return ch, cancel
}

// HTTP/2 bodies are read into slots too (stallUploads checks it), and a
// child killed while such reads wait there: each read is cut, each request
// gets 502, and the slots and the cap's count come back.
func TestStalledUploadsHTTP2ChildKilled(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("only Linux children get rings")
	}
	h := startModule(t, "ring", Options{})
	srv := serveHTTP2(t, h)
	c := firstChild(h)
	ring := c.sendRing

	const stalled = ringSlots + 4
	stallUploads(t, srv, c, stalled) // the test's cleanup ends them
	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	// (Go's HTTP/2 client returns no response while its request's body
	// blocks: the parent's count of 502s is what shows them.)
	awaitStats(t, h, 20*time.Second, "502 for every stalled upload", func(st Stats) bool { return st.BadGateway == stalled })
	assert.Eventually(t, func() bool { return c.conn.readSlots.Load() == 0 && takenSlots(ring) == 0 }, 10*time.Second, time.Millisecond,
		"%d slots taken, %d reads in slots", takenSlots(ring), c.conn.readSlots.Load())
}

// uploadWhole uploads 8 chunks to the ring module's /upload and checks
// that the handler read them all, in order.
func uploadWhole(t *testing.T, srv *httptest.Server) {
	t.Helper()
	body := bytes.Repeat(ringPattern(chunkSize), 8)
	res, err := http.Post(srv.URL+"/upload", "application/octet-stream", bytes.NewReader(body))
	require.NoError(t, err)
	got, err := io.ReadAll(res.Body)
	res.Body.Close()
	require.NoError(t, err)
	require.Equal(t, fmt.Sprintf("%x", sha256.Sum256(body)), string(got), "the SHA-256 of the upload as the handler read it")
}

// untilDone is a body part that sends nothing until its context ends: a
// client that stops sending.
type untilDone struct{ ctx context.Context }

func (u untilDone) Read([]byte) (int, error) {
	<-u.ctx.Done()
	return 0, u.ctx.Err()
}

// The child reads a request body chunk from the down ring where the
// parent put it, frees the slot once the handler has read it, and takes a
// bad reference for a protocol error, as the parent does.
func TestServerRingChunk(t *testing.T) {
	want := []byte("request bytes in shared memory")
	tests := []struct {
		name string
		ref  outFrame
		ok   bool
	}{
		{"good", refFrame(1, 2, uint32(len(want))), true},
		{"out of range", refFrame(1, ringSlots, 1), false},
		{"empty", refFrame(1, 2, 0), false},
		{"oversized", refFrame(1, 2, chunkSize+1), false},
		{"wrong size", outFrame{kind: kindDataRef, id: 1, data: []byte{0, 0, 0, 2}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ring := newLocalRing()
			copy(ring.slot(2), want)
			ring.state[2].Store(ringTaken)
			r, err := dispatchToBody(t, tt.ref, ring)
			if !tt.ok {
				var pe *protocolError
				require.ErrorAs(t, err, &pe)
				return
			}
			require.NoError(t, err)
			got := make([]byte, 100)
			n, err := r.req.Body.Read(got)
			require.NoError(t, err)
			require.Equal(t, want, got[:n])
			require.Equal(t, uint32(ringFree), ring.state[2].Load(), "the slot read from is not free for the parent")
			require.Equal(t, 0, heldSlots(ring))
		})
	}

	// A child without a down ring takes none.
	srv := newServer(context.Background(), nil, newConn(bytes.NewReader(frames(refFrame(1, 0, 1))), nopWriteCloser{io.Discard}), newLocalWord(), http.NotFoundHandler())
	hdr, err := srv.fr.ReadHeader()
	require.NoError(t, err)
	var pe *protocolError
	require.ErrorAs(t, srv.dispatch(hdr, &srv.scratch), &pe)
}

// panicWriter is a ResponseWriter, as a middleware might wrap one, that
// panics at its third write.
type panicWriter struct {
	http.ResponseWriter
	writes int
}

func (w *panicWriter) Write(p []byte) (int, error) {
	if w.writes++; w.writes == 3 {
		panic(http.ErrAbortHandler)
	}
	return w.ResponseWriter.Write(p)
}

func (w *panicWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// When the ResponseWriter panics in the middle of a response, the slots of
// the chunks queued for it, and of those the child sends after, come back.
func TestRingSlotsComeBackAfterPanic(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("only Linux children get a ring")
	}
	h := startModule(t, "ring", Options{})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&panicWriter{ResponseWriter: w}, r)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Start()
	t.Cleanup(srv.Close)
	ring := firstChild(h).ring
	for range 5 {
		res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(8<<20))
		require.NoError(t, err)
		_, err = io.Copy(io.Discard, res.Body)
		require.Error(t, err, "a response whose writer panicked was complete")
		res.Body.Close()
	}
	assert.Eventually(t, func() bool { return heldSlots(ring) == 0 && takenSlots(ring) == 0 }, 10*time.Second, time.Millisecond,
		"%d slots held, %d taken, with no response in flight", heldSlots(ring), takenSlots(ring))
}

// WriteTo, which io.Copy uses, writes a request body chunk by chunk,
// from where a Read left off, through pooled buffers and ring slots alike,
// freeing each slot and granting the parent its credit; it fails as Read
// does after Close or at the read deadline.
func TestBodyReaderWriteTo(t *testing.T) {
	ring := newLocalRing()
	var granted int
	b := newBodyReader(func(n int) { granted += n }, false, nil)
	first := chunk{buf: getBuffer(5), n: 5}
	copy(first.data(), "hello")
	require.NoError(t, b.push(first))
	copy(ring.slot(4), " ring ")
	require.True(t, ring.hold(4))
	require.NoError(t, b.push(chunk{ring: ring, slot: 4, n: 6}))
	last := chunk{buf: getBuffer(5), n: 5}
	copy(last.data(), "world")
	require.NoError(t, b.push(last))
	b.end(io.EOF, nil)

	p := make([]byte, 2)
	n, err := b.Read(p)
	require.NoError(t, err)
	require.Equal(t, "he", string(p[:n]))
	var out bytes.Buffer
	written, err := b.WriteTo(&out)
	require.NoError(t, err, "WriteTo at the body's end")
	require.Equal(t, "llo ring world", out.String())
	require.Equal(t, int64(out.Len()), written)
	require.Equal(t, 0, heldSlots(ring), "the slot written is still held")
	require.Zero(t, granted, "credit granted for a body that has ended")
	n, err = b.Read(p)
	require.Equal(t, 0, n)
	require.ErrorIs(t, err, io.EOF)

	// A WriteTo that waits for more fails when the handler closes the body.
	b = newBodyReader(func(n int) { granted += n }, false, nil)
	require.NoError(t, b.push(chunk{buf: getChunk(), n: chunkSize}))
	done := make(chan error, 1)
	go func() {
		_, err := b.WriteTo(io.Discard)
		done <- err
	}()
	b.Close()
	require.ErrorIs(t, <-done, http.ErrBodyReadAfterClose)

	expired := make(chan struct{})
	close(expired)
	b = newBodyReader(func(int) {}, false, nil)
	b.deadline = func() <-chan struct{} { return expired }
	_, err = b.WriteTo(io.Discard)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
}

// ringRecorder is a ResponseWriter that records, for each write, its
// length and whether its bytes lay in ring's memory.
type ringRecorder struct {
	h      http.Header
	ring   *bodyRing
	body   bytes.Buffer
	lens   []int
	shared []bool
}

func (w *ringRecorder) Header() http.Header { return w.h }
func (w *ringRecorder) WriteHeader(int)     {}
func (w *ringRecorder) Write(p []byte) (int, error) {
	w.lens = append(w.lens, len(p))
	w.shared = append(w.shared, inRing(p, w.ring))
	return w.body.Write(p)
}

// unwrapWriter is a middleware's writer that net/http's ResponseController
// can see through.
type unwrapWriter struct{ http.ResponseWriter }

func (w unwrapWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// inRing reports whether p starts inside one of rs' mappings.
func inRing(p []byte, rs ...*bodyRing) bool {
	if len(p) == 0 {
		return false
	}
	a := uintptr(unsafe.Pointer(&p[0]))
	for _, r := range rs {
		if r == nil {
			continue
		}
		lo := uintptr(unsafe.Pointer(&r.mem[0]))
		if a >= lo && a < lo+uintptr(len(r.mem)) {
			return true
		}
	}
	return false
}

// slotDataEvent returns a test child, a stream of it whose response head
// has been taken, and the stream's next event: a chunk of data, want, in
// slot 3 of the child's up ring, which the parent holds.
func slotDataEvent(t *testing.T, want []byte) (*child, *stream, event) {
	t.Helper()
	c := testChild(nil)
	s := newStream(1, window)
	require.NoError(t, s.push(event{kind: kindResponse, head: &responseHead{Status: 200}}))
	copy(c.ring.slot(3), want)
	require.True(t, c.ring.hold(3))
	require.NoError(t, s.push(event{kind: kindData, chunk: chunk{ring: c.ring, slot: 3, n: len(want)}}))
	_, err := s.next(nil)
	require.NoError(t, err)
	ev, err := s.next(nil)
	require.NoError(t, err)
	return c, s, ev
}

// A body's first bytes from the ring, which net/http sniffs when the
// header has no Content-Type, reach the ResponseWriter from a copy: the
// parent's code never reads shared memory. The rest, and every byte of a
// typed body, are written from the ring.
func TestSniffedBytesAreCopied(t *testing.T) {
	for _, tc := range []struct{ typed, direct bool }{{false, true}, {true, true}, {true, false}} {
		typed := tc.typed
		want := ringPattern(20000)
		c, s, ev := slotDataEvent(t, want)

		w := &ringRecorder{h: http.Header{}, ring: c.ring}
		if typed {
			w.h.Set("Content-Type", "application/octet-stream")
		}
		// (A ringRecorder stands for the server's own writer, or, not
		// direct, for a middleware's: see serverWriter.)
		x := &exchange{w: w, ctx: context.Background(), c: c, s: s, writerChecked: true, directWriter: tc.direct}
		require.True(t, x.writeData(ev))
		require.Equal(t, want, w.body.Bytes())
		require.Equal(t, 0, heldSlots(c.ring), "the slot was not freed")
		if !tc.direct {
			require.Equal(t, []int{len(want)}, w.lens)
			require.Equal(t, []bool{false}, w.shared, "a middleware's writer was handed shared memory")
		} else if typed {
			require.Equal(t, []int{len(want)}, w.lens)
			require.Equal(t, []bool{true}, w.shared, "a typed body was copied")
		} else {
			require.Equal(t, []int{sniffLen, len(want) - sniffLen}, w.lens)
			require.Equal(t, []bool{false, true}, w.shared, "the sniffed bytes came from shared memory, or the rest was copied")
		}
	}
}

// A child killed while the parent holds its slots, for a response whose
// client stopped reading: the parent writes what it had from the dead
// child's ring, still mapped (to a middleware's writer, from copies), aborts
// the response, frees the slots, and the next child, with rings of its
// own, serves.
func TestRingOfAKilledChild(t *testing.T) {
	t.Run("net/http's writer", func(t *testing.T) {
		srv, c := startRingModule(t)
		killWhileSlotsHeld(t, srv, c)
	})
	t.Run("a middleware's writer", func(t *testing.T) {
		// It gets copies of the slots (see serverWriter): the slots it
		// holds are those queued for it.
		_, c := startRingModule(t)
		srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c.h.ServeHTTP(unwrapWriter{w}, r)
		}))
		killWhileSlotsHeld(t, srv, c)
	})
}

// killWhileSlotsHeld stalls a large response of the ring module from
// child c through srv until the parent holds some of c's slots, kills c,
// and checks that the response ends cut, the slots come back, and the
// next child serves a response whole.
func killWhileSlotsHeld(t *testing.T, srv *httptest.Server, c *child) {
	t.Helper()
	res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(1<<30))
	require.NoError(t, err)
	defer res.Body.Close()
	_, err = io.ReadFull(res.Body, make([]byte, 1<<20))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return heldSlots(c.ring) > 0 }, 10*time.Second, time.Millisecond, "no chunk of a stalled response is held in a slot")

	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	n, err := io.Copy(io.Discard, res.Body)
	require.Error(t, err, "the response of a killed child ended cleanly, after %d more bytes", n)
	assert.Eventually(t, func() bool { return heldSlots(c.ring) == 0 }, 10*time.Second, time.Millisecond, "%d slots of the dead child held", heldSlots(c.ring))

	res2, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(4<<20))
	require.NoError(t, err)
	defer res2.Body.Close()
	n, err = io.Copy(io.Discard, res2.Body)
	require.NoError(t, err)
	require.Equal(t, int64(4<<20), n, "the next child's response")
}

// A write of ringMin bytes or more goes straight into a slot of the up ring,
// which the frame then hands over: the handler's bytes are copied once, not
// into a buffer and again into a slot. Writes that span slots, small ones
// between them and flushes keep the body intact and give every slot back;
// bytes that must wait for window credit wait in a buffer, not in a slot
// the chunks in flight may need; and a slot left pending when the handler
// panics is given back unsent.
func TestResponseWriterFillsSlots(t *testing.T) {
	pattern := ringPattern(1 << 20)
	scripts := map[string][]int{ // bytes to write; -1 flushes, 0 pauses
		"/":        {40 << 10, 0, 30 << 10, -1, 5 << 10, chunkSize, 100 << 10, 20 << 10},
		"/stalled": {chunkSize, -1, 40 << 10, 0}, // the window's worth, then more
		"/panic":   {40 << 10, 0},
	}
	written, proceed := make(chan struct{}), make(chan struct{})
	p := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		off := 0
		for _, n := range scripts[r.URL.Path] {
			switch {
			case n < 0:
				w.(http.Flusher).Flush()
			case n == 0:
				written <- struct{}{}
				select {
				case <-proceed:
				case <-r.Context().Done():
					return
				}
			default:
				if _, err := w.Write(pattern[off : off+n]); err != nil {
					return
				}
				off += n
			}
		}
		if r.URL.Path == "/panic" {
			panic(http.ErrAbortHandler)
		}
	}))
	up := p.c.ring
	wait := func() {
		t.Helper()
		select {
		case <-written:
		case <-time.After(10 * time.Second):
			t.Fatal("the handler never wrote")
		}
	}
	allFree := func(when string) {
		t.Helper()
		assert.Eventually(t, func() bool { return heldSlots(up) == 0 && takenSlots(up) == 0 }, 10*time.Second, time.Millisecond,
			"%s: %d slots held, %d taken", when, heldSlots(up), takenSlots(up))
	}

	// The first write is in a slot, before anything is sent.
	s := openRequest(t, p.c, httptest.NewRequest("GET", "/", nil))
	wait()
	first := scripts["/"][0]
	require.Equal(t, 1, takenSlots(up), "slots taken for a pending write of %d bytes", first)
	for i := range ringSlots {
		if up.state[i].Load() == ringTaken {
			require.Equal(t, pattern[:first], up.slot(i)[:first], "the pending bytes are not in the taken slot")
		}
	}
	proceed <- struct{}{}
	status, body := readAll(t, p.c, s)
	require.Equal(t, http.StatusOK, status)
	want := 0
	for _, n := range scripts["/"] {
		want += max(n, 0)
	}
	require.Equal(t, pattern[:want], body, "the body differs from what the handler wrote")
	allFree("after the response")

	// The first chunk spends the window and waits, unread, in the parent;
	// the bytes after it wait for credit outside the ring.
	s = openRequest(t, p.c, httptest.NewRequest("GET", "/stalled", nil))
	wait()
	require.Eventually(t, func() bool { return heldSlots(up) == 1 }, 10*time.Second, time.Millisecond, "the first chunk never reached the parent")
	require.Equal(t, 1, takenSlots(up), "slots taken: the chunk sent, and none for the bytes without credit")
	giveUp(context.Background(), p.c, s)
	allFree("after the cancel")

	// A handler that panics with its bytes in a slot: the slot comes back.
	openRequest(t, p.c, httptest.NewRequest("GET", "/panic", nil))
	wait()
	require.Equal(t, 1, takenSlots(up), "slots taken for a pending write")
	proceed <- struct{}{}
	allFree("after the panic")
}
