package subproc

import (
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
)

// This file holds the flow control shared by parent and child: the pooled
// chunks that carry body bytes, the send window that bounds what a sender may
// have in flight, and the receive side of a request body in the child.
//
// Flow control is per stream and per direction, as in HTTP/2: a sender starts
// with a credit of window bytes, spends it on kindData frames, and gets it back
// in kindWindow frames as the receiver consumes the bytes. A receiver therefore
// never holds more than window bytes of one stream's body, and a stream whose
// reader stalls stops only its own sender.

// Body bytes travel in pooled buffers of two sizes: small ones for the many
// bodies of a few KiB, which would otherwise pin a whole chunk each while in
// flight, and chunks of chunkSize for the rest.
const smallChunk = 4 << 10

var (
	smallPool = sync.Pool{New: func() any {
		b := make([]byte, smallChunk)
		return &b
	}}
	chunkPool = sync.Pool{New: func() any {
		b := make([]byte, chunkSize)
		return &b
	}}
)

// getChunk returns a pooled buffer of chunkSize bytes.
func getChunk() *[]byte { return chunkPool.Get().(*[]byte) }

// getBuffer returns a pooled buffer for n bytes, n <= chunkSize: a small
// one if n fits, else a chunk.
func getBuffer(n int) *[]byte {
	if n <= smallChunk {
		return smallPool.Get().(*[]byte)
	}
	return getChunk()
}

// putChunk returns a buffer from getChunk or getBuffer to its pool. It
// ignores nil.
func putChunk(b *[]byte) {
	if b == nil {
		return
	}
	switch cap(*b) {
	case chunkSize:
		*b = (*b)[:chunkSize]
		chunkPool.Put(b)
	case smallChunk:
		*b = (*b)[:smallChunk]
		smallPool.Put(b)
	}
}

// maxCredit bounds a send window, so that a peer granting absurd credit is
// caught instead of overflowing the counter.
const maxCredit = 1 << 30

// errWindowOverflow reports a peer that granted more credit than can be
// outstanding.
var errWindowOverflow = errors.New("window update overflows the send window")

// A sendWindow is the credit one sender has left on one stream. take is
// called by the one goroutine that sends the stream's body; add and close may
// be called from any goroutine.
type sendWindow struct {
	wake chan struct{} // capacity 1; signalled when credit grows or err is set

	mu     sync.Mutex // guards the fields below
	credit int
	err    error // once set, take fails with it
}

func newSendWindow(credit int) *sendWindow {
	w := new(sendWindow)
	w.init(credit)
	return w
}

// init prepares a zero sendWindow with the given credit.
func (w *sendWindow) init(credit int) {
	w.credit = credit
	w.wake = make(chan struct{}, 1)
}

// take waits until at least least bytes of credit are available and takes
// up to most of them. least must not exceed window. take returns early with
// the window's error if it is closed, or errCanceled if cancel is closed.
func (w *sendWindow) take(least, most int, cancel <-chan struct{}) (int, error) {
	for {
		w.mu.Lock()
		if w.err != nil {
			err := w.err
			w.mu.Unlock()
			return 0, err
		}
		if w.credit >= least && w.credit > 0 {
			n := min(most, w.credit)
			w.credit -= n
			w.mu.Unlock()
			return n, nil
		}
		w.mu.Unlock()
		select {
		case <-w.wake:
		case <-cancel:
			return 0, errCanceled
		}
	}
}

// add returns n bytes of credit, from a kindWindow frame or from a take whose
// bytes were not all used.
func (w *sendWindow) add(n int) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if n < 0 || w.credit+n > maxCredit {
		return errWindowOverflow
	}
	w.credit += n
	w.signal()
	return nil
}

// close makes every later take fail with err. The first error sticks.
func (w *sendWindow) close(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
		w.signal()
	}
}

func (w *sendWindow) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// windowPayload encodes a window increment.
func windowPayload(b *[4]byte, n int) []byte {
	binary.BigEndian.PutUint32(b[:], uint32(n))
	return b[:]
}

// A bodyReader is a request body as the child's handler sees it. The child's
// readLoop pushes the parent's kindData chunks into it; the handler reads
// them, and every chunk it finishes is granted back to the parent. It never
// holds more than window bytes.
type bodyReader struct {
	grant   func(n int)   // sends a window update to the parent; fixed
	trailer http.Header   // the request's Trailer, filled at the end; fixed map
	wake    chan struct{} // capacity 1; signalled on every change

	mu       sync.Mutex // guards the fields below
	chunks   []*[]byte  // queued chunks; the first is read from off
	lens     []int      // bytes in each queued chunk
	off      int
	queued   int   // what the queued chunks cost against the window
	err      error // returned once the queue is empty: io.EOF at the end
	closed   bool  // the handler closed the body, or returned
	expect   bool  // the parent waits for a first read before sending (Expect: 100-continue)
	consumed int   // the cost of chunks read and not yet granted back
}

func newBodyReader(grant func(int), trailer http.Header, expectContinue bool) *bodyReader {
	return &bodyReader{grant: grant, trailer: trailer, expect: expectContinue, wake: make(chan struct{}, 1)}
}

// errBodyWindow reports a parent that sent more body than the window allows.
var errBodyWindow = errors.New("request body exceeds the flow-control window")

// push queues a chunk of n bytes. It takes ownership of buf.
func (b *bodyReader) push(buf *[]byte, n int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.err != nil {
		putChunk(buf)
		return nil
	}
	if b.queued+frameCost(n) > window {
		putChunk(buf)
		return errBodyWindow
	}
	b.chunks = append(b.chunks, buf)
	b.lens = append(b.lens, n)
	b.queued += frameCost(n)
	b.signal()
	return nil
}

// end ends the body with err (io.EOF for a complete body) and, for a
// complete body, fills in the trailer values.
func (b *bodyReader) end(err error, trailer http.Header) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return
	}
	for k, v := range trailer {
		if _, ok := b.trailer[k]; ok {
			b.trailer[k] = v
		}
	}
	b.err = err
	b.signal()
}

func (b *bodyReader) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Read reads body bytes, waiting for the parent to send them.
func (b *bodyReader) Read(p []byte) (int, error) {
	b.mu.Lock()
	if b.expect {
		// The parent sends nothing of an Expect: 100-continue body until
		// the handler first reads it, as net/http sends "100 Continue".
		b.expect = false
		b.mu.Unlock()
		b.grant(window)
		b.mu.Lock()
	}
	for len(b.chunks) == 0 && b.err == nil && !b.closed {
		b.mu.Unlock()
		<-b.wake
		b.mu.Lock()
	}
	if b.closed {
		b.mu.Unlock()
		return 0, http.ErrBodyReadAfterClose
	}
	if len(b.chunks) == 0 {
		err := b.err
		b.mu.Unlock()
		return 0, err
	}
	n := 0
	for n < len(p) && len(b.chunks) > 0 {
		c := (*b.chunks[0])[b.off:b.lens[0]]
		k := copy(p[n:], c)
		n += k
		b.off += k
		if b.off == b.lens[0] {
			b.queued -= frameCost(b.lens[0])
			b.consumed += frameCost(b.lens[0])
			putChunk(b.chunks[0])
			b.chunks[0] = nil
			b.chunks, b.lens, b.off = b.chunks[1:], b.lens[1:], 0
		}
	}
	grant := 0
	if b.consumed >= grantThreshold {
		grant, b.consumed = b.consumed, 0
	}
	b.mu.Unlock()
	if grant > 0 {
		b.grant(grant)
	}
	return n, nil
}

// Close discards what is queued; later reads fail.
func (b *bodyReader) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for _, c := range b.chunks {
		putChunk(c)
	}
	b.chunks, b.lens, b.queued = nil, nil, 0
	b.signal()
	return nil
}

var _ io.ReadCloser = (*bodyReader)(nil)

// A stream is the parent's side of one request sent to a child: the
// response messages the child's readLoop delivers, queued for the request's
// goroutine, and the credit for sending the request body.
type stream struct {
	id          uint64        // fixed
	bodyTouched atomic.Bool   // the request body has been read from
	win         sendWindow    // request-body credit granted by the child
	wake        chan struct{} // capacity 1; signalled on every push and on failure

	mu        sync.Mutex // guards the fields below
	events    []event
	inline    [4]event // events' first backing array: most responses fit
	queued    int      // what the kindData events cost against the window
	informal  int      // 1xx response heads received
	final     bool     // the final (non-1xx) response head has arrived
	ended     bool     // kindEnd or kindAbort has arrived: the child is done with the stream
	err       error    // the stream failed: the child can no longer answer
	abandoned bool     // the request's goroutine has gone; what arrives is dropped
}

// An event is one message of a response, in the order the child sent it.
type event struct {
	kind    uint8
	flags   uint8
	head    *responseHead // kindResponse
	buf     *[]byte       // kindData: a pooled chunk, owned by the receiver of the event
	n       int           // kindData: bytes in buf
	trailer http.Header   // kindEnd
}

func newStream(id uint64, credit int) *stream {
	s := &stream{id: id, wake: make(chan struct{}, 1)}
	s.win.init(credit)
	s.events = s.inline[:0]
	return s
}

// push queues an event from the child. It returns an error, and queues
// nothing, if the event breaks the protocol: a response after the final one,
// body before the response, more body than the window, or too many events.
// It takes ownership of ev.buf.
func (s *stream) push(ev event) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.checkLocked(ev)
	if err != nil || s.abandoned || s.err != nil {
		putChunk(ev.buf)
		return err
	}
	s.events = append(s.events, ev)
	if ev.kind == kindData {
		s.queued += frameCost(ev.n)
	}
	s.signal()
	return nil
}

// checkLocked checks that ev may follow what the stream has received, and
// records it.
func (s *stream) checkLocked(ev event) error {
	if s.ended {
		return errors.New("message after the end of the response")
	}
	switch ev.kind {
	case kindResponse:
		st := ev.head.Status
		switch {
		case s.final:
			return errors.New("second response head")
		case st < 100 || st > 999:
			return errors.New("response status out of range")
		case st >= 200 || st == http.StatusSwitchingProtocols:
			s.final = true
		default:
			s.informal++
			if s.informal > maxInformational {
				return errors.New("too many 1xx responses")
			}
		}
	case kindData:
		if !s.final {
			return errors.New("response body before the response head")
		}
		if s.queued+frameCost(ev.n) > window {
			return errors.New("response body exceeds the flow-control window")
		}
	case kindEnd:
		if !s.final {
			return errors.New("end of response before the response head")
		}
		s.ended = true
	case kindAbort:
		s.ended = true
	}
	return nil
}

// fail makes the stream fail with err once its queued events are consumed.
// The first error sticks.
func (s *stream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
		s.signal()
	}
	s.win.close(err)
}

// abandon drops what is queued and whatever arrives later; the request's
// goroutine calls it when it stops reading.
func (s *stream) abandon() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.abandoned = true
	for _, ev := range s.events {
		putChunk(ev.buf)
	}
	s.events, s.queued = nil, 0
}

// answered reports whether the child ended the response, with kindEnd or
// kindAbort.
func (s *stream) answered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended
}

func (s *stream) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// next returns the next event, waiting for one. Once the queue is empty, a
// failed stream returns its error. cancel interrupts the wait with
// errCanceled.
func (s *stream) next(cancel <-chan struct{}) (event, error) {
	for {
		s.mu.Lock()
		if len(s.events) > 0 {
			ev := s.events[0]
			s.events[0] = event{}
			s.events = s.events[1:]
			if len(s.events) == 0 {
				s.events = s.inline[:0]
			}
			if ev.kind == kindData {
				s.queued -= frameCost(ev.n)
			}
			s.mu.Unlock()
			return ev, nil
		}
		if err := s.err; err != nil {
			s.mu.Unlock()
			return event{}, err
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-cancel:
			return event{}, errCanceled
		}
	}
}

// errCanceled reports that the request's context ended while waiting.
var errCanceled = errors.New("subproc: request canceled")
