package subproc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Tests of the adaptive windows and of the module's flowBudget (stream.go).

// frozenClock is a flowBudget clock under which every stream drains
// infinitely fast: time never passes.
func frozenClock() time.Time { return time.Unix(1e9, 0) }

// crawlingClock returns a flowBudget clock under which every stream drains
// slowly: each reading is an hour after the last.
func crawlingClock() func() time.Time {
	var hours atomic.Int64
	return func() time.Time { return time.Unix(1e9, 0).Add(time.Duration(hours.Add(1)) * time.Hour) }
}

// simStream is a sender and a receiver of one stream, played in memory: the
// sender spends its credit in frames of up to a chunk, the receiver queues
// them in its recvWindow and consumes them when told.
type simStream struct {
	t      *testing.T
	w      recvWindow
	frame  int   // the most bytes the sender puts in a frame
	credit int   // the sender's
	queue  []int // the cost of each frame received and not consumed
}

func newSimStream(t *testing.T, b *flowBudget) *simStream {
	s := &simStream{t: t, frame: chunkSize, credit: initialWindow}
	s.w.init(b, initialWindow)
	return s
}

// send has the sender spend all its credit.
func (s *simStream) send() {
	s.t.Helper()
	for s.credit >= frameCost(1) {
		c := frameCost(min(s.frame, s.credit-frameOverhead))
		if err := s.w.receive(c); err != nil {
			s.t.Fatalf("a frame within the credit: %v", err)
		}
		s.credit -= c
		s.queue = append(s.queue, c)
	}
}

// consume has the receiver consume one frame and grant what it returns.
func (s *simStream) consume() {
	c := s.queue[0]
	s.queue = s.queue[1:]
	s.credit += s.w.consume(c, len(s.queue) == 0)
}

// run has the sender and a receiver that keeps up exchange rounds frames.
func (s *simStream) run(rounds int) {
	for range rounds {
		s.send()
		for len(s.queue) > 0 {
			s.consume()
		}
	}
}

func TestFlowBudgetReserve(t *testing.T) {
	var zero flowBudget
	got := zero.size()
	require.EqualValues(t, flowBudgetSize, got, "zero budget: size %d, want flowBudgetSize (%d)", got, flowBudgetSize)
	b := &flowBudget{limit: 100}
	require.True(t, b.reserve(60), "reserving up to the limit failed")
	require.True(t, b.reserve(40), "reserving up to the limit failed")
	require.False(t, b.reserve(1), "reserved beyond the limit")
	b.release(40)
	require.False(t, b.reserve(41), "reserved beyond the limit after a release")
	require.True(t, b.reserve(40), "a release did not return its bytes")

	// Concurrent reservations never take more than the budget together.
	b = &flowBudget{limit: 10 * initialWindow}
	var over atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				n := initialWindow * (1 + (g+i)%4)
				if b.reserve(n) {
					if r := b.reserved.Load(); r > b.limit {
						over.Store(r)
					}
					b.release(n)
				}
			}
		})
	}
	wg.Wait()
	require.Zero(t, over.Load(), "reserved %d of a budget of %d", over.Load(), b.limit)
	require.Zero(t, b.reserved.Load(), "%d bytes left reserved after every release", b.reserved.Load())
}

// A stream whose receiver keeps up doubles its window up to window; one
// whose receiver is slow, or holds frames back, or consumes nothing, keeps
// its initial window.
func TestWindowGrowth(t *testing.T) {
	t.Run("fast", func(t *testing.T) {
		b := &flowBudget{now: frozenClock}
		s := newSimStream(t, b)
		sizes := []int{s.w.size}
		for range 20 {
			s.run(1)
			if s.w.size != sizes[len(sizes)-1] {
				sizes = append(sizes, s.w.size)
			}
		}
		want := []int{initialWindow, 2 * initialWindow, 4 * initialWindow, 8 * initialWindow, window}
		require.True(t, equalInts(sizes, want), "window sizes %v, want %v", sizes, want)
		if r := b.reserved.Load(); r != window-initialWindow {
			t.Fatalf("budget reserved %d, want %d", r, window-initialWindow)
		}
		if s.credit+s.w.owed != window {
			t.Fatalf("the sender has %d of credit and the receiver owes %d, with nothing in flight; want the window %d in all", s.credit, s.w.owed, window)
		}
		s.w.release()
		require.Zero(t, b.reserved.Load(), "after release: reserved %d, held %d", b.reserved.Load(), b.held.Load())
		require.Zero(t, b.held.Load(), "after release: reserved %d, held %d", b.reserved.Load(), b.held.Load())
	})
	t.Run("slow", func(t *testing.T) {
		b := &flowBudget{now: crawlingClock()}
		s := newSimStream(t, b)
		s.run(50)
		require.Equal(t, initialWindow, s.w.size, "a slow stream's window grew to %d (budget reserved %d)", s.w.size, b.reserved.Load())
		require.Zero(t, b.reserved.Load(), "a slow stream's window grew to %d (budget reserved %d)", s.w.size, b.reserved.Load())
	})
	t.Run("consumer bound", func(t *testing.T) {
		// Frames are still queued when credit goes back: the consumer,
		// not the window, holds the stream back.
		b := &flowBudget{now: frozenClock}
		s := newSimStream(t, b)
		s.frame = smallChunk
		for range 50 {
			s.send()
			for credit := s.credit; s.credit == credit; {
				s.consume()
			}
			require.NotEmpty(t, s.queue, "the simulation does not keep frames queued")
		}
		require.Equal(t, initialWindow, s.w.size, "a consumer-bound stream's window grew to %d", s.w.size)
		require.Zero(t, b.reserved.Load(), "a consumer-bound stream's window grew to %d", s.w.size)
	})
	t.Run("stalled", func(t *testing.T) {
		b := &flowBudget{now: frozenClock}
		s := newSimStream(t, b)
		for range 10 {
			s.send()
		}
		require.Equal(t, initialWindow, s.w.size, "a stalled stream's window grew to %d", s.w.size)
		require.Zero(t, b.reserved.Load(), "a stalled stream's window grew to %d", s.w.size)
		require.EqualValues(t, initialWindow, b.held.Load(), "a stalled stream holds %d, want its initial window %d", b.held.Load(), initialWindow)
	})
	t.Run("overrun", func(t *testing.T) {
		s := newSimStream(t, &flowBudget{now: frozenClock})
		s.send()
		err := s.w.receive(frameCost(1))
		require.Error(t, err, "a frame beyond the credit was accepted")
	})
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Fast streams grow only as far as the budget goes: together they never
// reserve more, those that find it spent keep their initial window and go
// on, and a stream that ends gives its growth to the others.
func TestWindowBudgetShared(t *testing.T) {
	b := &flowBudget{limit: 3 * initialWindow, now: frozenClock}
	var streams []*simStream
	for range 4 {
		streams = append(streams, newSimStream(t, b))
	}
	total := func() (sum int) {
		for _, s := range streams {
			sum += s.w.size
		}
		return sum
	}
	for round := range 20 {
		for _, s := range streams {
			s.run(1)
			r := b.reserved.Load()
			require.LessOrEqual(t, r, b.limit, "round %d: %d reserved of a budget of %d", round, r, b.limit)
			sum := total()
			require.LessOrEqual(t, int64(sum), b.limit+int64(len(streams))*initialWindow, "round %d: windows total %d, over the budget plus the initial windows", round, sum)
		}
	}
	require.Equal(t, b.limit, b.reserved.Load(), "the fast streams reserved %d of %d", b.reserved.Load(), b.limit)
	last := streams[len(streams)-1]
	require.Equal(t, initialWindow, last.w.size, "the last stream grew to %d with the budget spent", last.w.size)
	// The spent budget starves no one: the last stream still moves a
	// window per round.
	moved := last.w.received
	last.run(1)
	require.GreaterOrEqual(t, last.w.received-moved, int64(initialWindow), "the last stream moved %d in a round", last.w.received-moved)
	// The first stream ends: the last grows.
	streams[0].w.release()
	streams = streams[1:]
	for range 5 {
		last.run(1)
	}
	if last.w.size == initialWindow {
		t.Fatal("the budget a stream returned went to no other stream")
	}
}

// A request body the handler reads quickly grows its window from the
// child's budget; the growth is returned when the body is closed.
func TestBodyWindowGrowth(t *testing.T) {
	b := &flowBudget{now: frozenClock}
	var credit atomic.Int64
	credit.Store(initialWindow)
	body := newBodyReader(func(n int) { credit.Add(int64(n)) }, false, b)
	buf := make([]byte, chunkSize)
	for range 64 {
		for credit.Load() >= int64(frameCost(chunkSize)) {
			credit.Add(-int64(frameCost(chunkSize)))
			require.NoError(t, body.push(chunk{buf: getChunk(), n: chunkSize}))
		}
		for {
			body.mu.Lock()
			n := len(body.chunks)
			body.mu.Unlock()
			if n == 0 {
				break
			}
			if _, err := io.ReadFull(body, buf); err != nil {
				t.Fatal(err)
			}
		}
	}
	if r := b.reserved.Load(); r != window-initialWindow {
		t.Fatalf("a fast body reserved %d, want %d", r, window-initialWindow)
	}
	require.NoError(t, body.push(chunk{buf: getChunk(), n: chunkSize}))
	body.Close()
	require.Zero(t, b.reserved.Load(), "after Close: reserved %d, held %d", b.reserved.Load(), b.held.Load())
	require.Zero(t, b.held.Load(), "after Close: reserved %d, held %d", b.reserved.Load(), b.held.Load())
	// A parent that sends beyond its credit breaks the protocol.
	body = newBodyReader(func(int) {}, false, b)
	body.push(chunk{buf: getChunk(), n: chunkSize})
	require.Error(t, body.push(chunk{buf: getBuffer(1), n: 1}), "a chunk beyond the window was accepted")
	body.Close()
}

// abortRecorder is an http.ResponseWriter that fails its writes, as a
// client that went away does, once after is closed.
type abortRecorder struct {
	*httptest.ResponseRecorder
	after chan struct{}
}

func (w abortRecorder) Write(p []byte) (int, error) {
	select {
	case <-w.after:
		return 0, errors.New("client gone")
	default:
		return len(p), nil
	}
}

// However a response ends, its stream returns the window growth it
// reserved and what it held to the Handle's budget.
func TestWindowReleasedOnEveryEnd(t *testing.T) {
	const before = 4 << 20 // bytes the handler writes before the end
	type end int
	const (
		complete end = iota
		abort
		cancel
		clientGone
		childDeath
	)
	for _, tt := range []struct {
		name string
		end  end
	}{
		{"complete", complete},
		{"abort", abort},
		{"cancel", cancel},
		{"client gone", clientGone},
		{"child death", childDeath},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reached := make(chan struct{}) // the handler has written before
			var once sync.Once
			release := make(chan struct{}) // ends a handler that hangs
			handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				p := bytes.Repeat([]byte("w"), chunkSize)
				for n := 0; ; n += len(p) {
					if n >= before {
						once.Do(func() { close(reached) })
						switch tt.end {
						case complete:
							return
						case abort:
							panic(http.ErrAbortHandler)
						case cancel:
							if r.Context().Err() != nil {
								// Its writes would go on reaching w,
								// which reads on (see
								// exchange.stayOn): it hangs, and the
								// parent gives the request up.
								<-release
								return
							}
						}
					}
					if _, err := w.Write(p); err != nil {
						return
					}
				}
			})
			pp := newPipePairFlow(t, handler, 0, frozenClock)
			t.Cleanup(func() { close(release) }) // before pp's
			ctx, stop := context.WithCancel(context.Background())
			defer stop()
			r := httptest.NewRequest("GET", "/", nil).WithContext(ctx)
			s := openRequest(t, pp.c, r)
			gone := make(chan struct{})
			w := abortRecorder{httptest.NewRecorder(), gone}
			go func() {
				<-reached
				switch tt.end {
				case cancel:
					stop()
				case clientGone:
					close(gone)
				case childDeath:
					pp.kill()
				}
			}()
			func() {
				defer func() {
					if v := recover(); v != nil && v != http.ErrAbortHandler {
						panic(v)
					}
				}()
				pp.c.h.proxy(w, r, pp.c, s, false)
			}()
			size := sizeOf(s)
			require.Greater(t, size, initialWindow, "the stream's window never grew (%d): the test tests nothing", size)
			b := pp.c.flow
			res, held := b.reserved.Load(), b.held.Load()
			require.Zero(t, res, "after the response ended: %d reserved, %d held", res, held)
			require.Zero(t, held, "after the response ended: %d reserved, %d held", res, held)
		})
	}
}

// A stream that stalls does not stop another from getting credit: a stream
// stalled from the start takes nothing from the budget, so a fast stream
// beside it grows to the full window; and when stalled streams that had
// grown hold the whole budget, a fast stream still moves on its initial
// window.
func TestWindowStalledDoesNotStarveFast(t *testing.T) {
	const total = 8 << 20
	// A window grows only while its stream has nothing queued as it
	// returns credit. /paced?id= sends each chunk once the reader has
	// taken the one before (see readPaced), so that the fast streams
	// drain quickly however loaded the machine.
	var paced sync.Map // id → chan struct{}
	mux := http.NewServeMux()
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		p := bytes.Repeat([]byte("s"), chunkSize)
		for n := 0; n < total; n += len(p) {
			if _, err := w.Write(p); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/paced", func(w http.ResponseWriter, r *http.Request) {
		next, _ := paced.Load(r.URL.Query().Get("id"))
		p := bytes.Repeat([]byte("s"), chunkSize)
		for n := 0; n < total; n += len(p) {
			if n > 0 {
				select {
				case <-next.(chan struct{}):
				case <-r.Context().Done():
					return
				}
			}
			if _, err := w.Write(p); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	})
	// A budget that one grown stream spends.
	pp := newPipePairFlow(t, mux, window-initialWindow, frozenClock)
	b := pp.c.flow
	openPaced := func(id string) (*stream, chan struct{}) {
		next := make(chan struct{}, 1)
		paced.Store(id, next)
		return openRequest(t, pp.c, httptest.NewRequest("GET", "/paced?id="+id, nil)), next
	}
	// taken returns the credit of a data event the reader has taken, and
	// lets its stream's handler send the next chunk.
	taken := func(s *stream, ev event, next chan struct{}) {
		ev.release()
		if n := s.consume(ev.n); n > 0 {
			pp.c.sendWindowUpdate(s.id, n, nil)
		}
		select {
		case next <- struct{}{}:
		default:
		}
	}
	readPaced := func(s *stream, next chan struct{}) (n int) {
		for {
			ev, err := s.next(nil)
			require.NoError(t, err, "stream %d", s.id)
			switch ev.kind {
			case kindData:
				n += ev.n
				taken(s, ev, next)
			case kindEnd:
				return n
			case kindAbort:
				t.Fatalf("stream %d aborted", s.id)
			}
		}
	}

	stalled := openRequest(t, pp.c, httptest.NewRequest("GET", "/stream", nil))
	waitFull(t, "stalled stream", heldOf(stalled), stalled.wake, initialWindow, frameCost(1))
	require.Zero(t, b.reserved.Load(), "a stream stalled from the start reserved %d bytes of the budget", b.reserved.Load())
	fast, next := openPaced("fast")
	require.Equal(t, total, readPaced(fast, next), "fast stream's bytes")
	require.Zero(t, b.reserved.Load(), "%d bytes still reserved with only a stalled stream left", b.reserved.Load())
	require.Equal(t, window, sizeOf(fast), "the fast stream's window grew to %d beside a stalled one, want %d", sizeOf(fast), window)

	// A stream grows, spends the budget, then stalls.
	grown, grownNext := openPaced("grown")
	for b.reserved.Load() < b.limit {
		ev, err := grown.next(nil)
		require.NoError(t, err)
		if ev.kind == kindEnd {
			t.Fatalf("the stream ended with %d reserved of %d", b.reserved.Load(), b.limit)
		}
		if ev.kind == kindData {
			taken(grown, ev, grownNext)
		}
	}
	fast, next = openPaced("fast2")
	require.Equal(t, total, readPaced(fast, next), "fast stream's bytes with the budget spent")
	require.Equal(t, initialWindow, sizeOf(fast), "the fast stream grew to %d with the budget spent", sizeOf(fast))
	// The stalled streams finish.
	readAll(t, pp.c, stalled)
	readPaced(grown, grownNext)
	require.Zero(t, b.reserved.Load(), "after every stream ended: %d reserved, %d held", b.reserved.Load(), b.held.Load())
	require.Zero(t, b.held.Load(), "after every stream ended: %d reserved, %d held", b.reserved.Load(), b.held.Load())
}

// heldOf reports what a parent stream holds against its window: queued, and
// taken but not consumed.
func heldOf(s *stream) func() int {
	return func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.recv.held
	}
}

// sizeOf reports a parent stream's response window.
func sizeOf(s *stream) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.recv.size
}

// A handler's pending chunk goes out in parts when the credit the parent
// has returned is less than the chunk costs: the parent holds back less
// than half a window, which with a window of one chunk can leave the child
// with less credit than a chunk costs, and waiting for a whole chunk's
// worth would then wait forever.
func TestResponseSendsWhatCreditAllows(t *testing.T) {
	const first = 30000 // flushed; consumed, it leaves credit owed but not returned
	pp := newPipePairFlow(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("a"), first))
		w.(http.Flusher).Flush()
		w.Write(bytes.Repeat([]byte("b"), 3*chunkSize))
	}), 0, crawlingClock())
	s := openRequest(t, pp.c, httptest.NewRequest("GET", "/", nil))
	timeout := make(chan struct{})
	timer := time.AfterFunc(10*time.Second, func() { close(timeout) })
	defer timer.Stop()
	var body []byte
	for {
		ev, err := s.next(timeout)
		require.NoError(t, err, "after %d bytes of the body: %v (the child waits for credit the parent holds back)", len(body), err)
		if ev.kind == kindData {
			body = append(body, ev.data()...)
			ev.release()
			if n := s.consume(ev.n); n > 0 {
				pp.c.sendWindowUpdate(s.id, n, nil)
			}
		}
		if ev.kind == kindEnd {
			break
		}
	}
	want := first + 3*chunkSize
	require.Len(t, body, want, "body of %d bytes, want %d", len(body), want)
}

// The 1xx heads that a stream holds are bounded: a handler may send
// maxInformational of them, each near maxHeadSize, while the request's
// goroutine waits for a client that reads nothing. Past
// maxHeldInformational the newer ones are dropped; the first, small ones,
// and the final head never are.
func TestInformationalHeadsHeldBounded(t *testing.T) {
	info := func(values int) event {
		return event{kind: kindResponse, head: &responseHead{Status: http.StatusEarlyHints, Header: http.Header{"Link": make([]string, values)}}}
	}
	large := maxHeadSize / itemCost / 2 // a head of about 4 MiB decoded

	s := newStream(1, window)
	for range 31 {
		require.NoError(t, s.push(info(large)))
	}
	require.NoError(t, s.push(event{kind: kindResponse, head: &responseHead{Status: http.StatusOK}}))
	require.Len(t, s.events, 2, "31 large 1xx heads and a final one: the first and the final are held")
	assert.Equal(t, informationalCost(s.events[0]), s.infoHeld)
	ev, err := s.next(nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusEarlyHints, ev.head.Status)
	assert.Zero(t, s.infoHeld, "a 1xx head taken is no longer held")
	ev, err = s.next(nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, ev.head.Status)

	// Small ones, as many as a handler may send, are all held.
	s = newStream(2, window)
	for range maxInformational {
		require.NoError(t, s.push(info(8)))
	}
	assert.Len(t, s.events, maxInformational)
	s.abandon()
	assert.Zero(t, s.infoHeld)
}

// The heads and trailers that cost more than freeHeadCost decoded are
// charged to the module's head budget while the exchange may hold them: a
// final head or trailers that do not fit become an abort of their
// response, a 1xx head that does not fit is dropped, and what was charged
// comes back when a 1xx head is written or the exchange ends.
func TestHeadBudgetCharges(t *testing.T) {
	const free = freeHeadCost
	b := &flowBudget{limit: 3 * free}
	open := func(id uint64) *stream {
		s := newStream(id, window)
		s.heads = b
		return s
	}
	head := func(status, cost int) event {
		return event{kind: kindResponse, cost: int32(cost), head: &responseHead{Status: status}}
	}

	s1 := open(1)
	require.NoError(t, s1.push(head(http.StatusOK, 2*free)))
	assert.Equal(t, int64(2*free), b.reserved.Load(), "a large final head is charged")
	s2 := open(2)
	require.NoError(t, s2.push(head(http.StatusOK, free)))
	assert.Equal(t, int64(2*free), b.reserved.Load(), "a head of freeHeadCost is not")

	s3 := open(3)
	require.NoError(t, s3.push(head(http.StatusEarlyHints, 2*free)))
	assert.Empty(t, s3.events, "a 1xx head the budget cannot hold is dropped")
	require.NoError(t, s3.push(head(http.StatusOK, 2*free)))
	require.Len(t, s3.events, 1)
	ev := s3.events[0]
	assert.Equal(t, kindAbort, ev.kind, "a final head the budget cannot hold aborts its response")
	assert.Equal(t, flagOverBudget, ev.flags)
	assert.Equal(t, int32(2*free), ev.cost)
	require.NoError(t, s3.push(event{kind: kindData, chunk: chunk{n: 10}}), "the child may go on sending")
	require.NoError(t, s3.push(event{kind: kindEnd}))
	assert.Equal(t, int64(2*free), b.reserved.Load())

	require.NoError(t, s1.push(event{kind: kindEnd, cost: 2 * free, trailer: http.Header{"X": nil}}))
	require.Len(t, s1.events, 2)
	assert.Equal(t, kindAbort, s1.events[1].kind, "trailers the budget cannot hold abort their response")
	assert.Equal(t, flagOverBudget, s1.events[1].flags)

	s1.releaseHeads()
	assert.Zero(t, b.reserved.Load(), "the exchange's end returns the charge")
	s1.releaseHeads()
	assert.Zero(t, b.reserved.Load(), "once")

	s4 := open(4)
	require.NoError(t, s4.push(head(http.StatusEarlyHints, 2*free)))
	assert.Equal(t, int64(2*free), b.reserved.Load())
	ev, err := s4.next(nil)
	require.NoError(t, err)
	s4.uncharge(ev)
	assert.Zero(t, b.reserved.Load(), "a 1xx head written is no longer charged")
	s4.releaseHeads()
	assert.Zero(t, b.reserved.Load())
}
