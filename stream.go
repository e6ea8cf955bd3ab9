package subproc

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the flow control shared by parent and child: the pooled
// chunks that carry body bytes, the send window that bounds what a sender may
// have in flight, the receive window and the module's budget that bound what
// a receiver buffers, and the receive side of a request body in the child.
//
// Flow control is per stream and per direction, as in HTTP/2: a sender starts
// with a credit of initialWindow bytes, spends it on kindData frames, and gets
// it back in kindWindow frames as the receiver consumes the bytes. A receiver
// grows a stream's window, up to window, while the stream drains quickly,
// with credit reserved from a budget that all the streams of the module share
// in that direction (flowBudget), as HTTP/2's connection window bounds its
// streams. So what a receiver buffers for all the streams of a module
// together is at most flowBudgetSize + initialWindow × the streams in flight:
// a stream whose reader stalls stops only its own sender, holds its initial
// window and whatever it had grown to, and never takes credit from another
// stream's initial window.

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
	mu     sync.Mutex    // guards the fields below
	wake   chan struct{} // capacity 1; signalled when credit grows or err is set; made by the first take that waits
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
}

// take waits until at least least bytes of credit are available and takes
// up to most of them. least must not exceed window. take returns early with
// the window's error if it is closed, or errCanceled if cancel is closed.
func (w *sendWindow) take(least, most int, cancel <-chan struct{}) (int, error) {
	return w.takeEither(least, most, cancel, nil)
}

// takeEither is take with two channels that cancel it.
func (w *sendWindow) takeEither(least, most int, cancel, cancel2 <-chan struct{}) (int, error) {
	for {
		w.mu.Lock()
		if n, ok, err := w.tryTakeLocked(least, most); ok {
			w.mu.Unlock()
			return n, err
		}
		if w.wake == nil {
			// Most windows never wait: their channel is made when one
			// first does.
			w.wake = make(chan struct{}, 1)
		}
		wake := w.wake
		w.mu.Unlock()
		select {
		case <-wake:
		case <-cancel:
			return 0, errCanceled
		case <-cancel2:
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

// has reports whether the window holds at least n bytes of credit.
func (w *sendWindow) has(n int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.credit >= n
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

// signal wakes the take that waits, if any. The caller holds w.mu.
func (w *sendWindow) signal() {
	select {
	case w.wake <- struct{}{}: // a nil channel: no take has waited
	default:
	}
}

// tryTake is take without the wait: it reports false, taking nothing, if
// the window has less than least bytes of credit and no error.
func (w *sendWindow) tryTake(least, most int) (int, bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.tryTakeLocked(least, most)
}

// tryTakeLocked is tryTake with w.mu held.
func (w *sendWindow) tryTakeLocked(least, most int) (int, bool, error) {
	switch {
	case w.err != nil:
		return 0, true, w.err
	case w.credit >= least && w.credit > 0:
		n := min(most, w.credit)
		w.credit -= n
		return n, true, nil
	}
	return 0, false, nil
}

// windowPayload encodes a window increment.
func windowPayload(b *[4]byte, n int) []byte {
	binary.BigEndian.PutUint32(b[:], uint32(n))
	return b[:]
}

// A flowBudget is the window growth that all the streams of a module may
// reserve in one direction on one side: the parent's budget for its
// children's responses (Handle.flow, shared by every child of the Handle),
// and a child's for its request bodies (server.flow). A stream reserves from
// it when its window grows beyond initialWindow and returns what it reserved
// when it ends, however it ends. Once the budget is spent, streams keep the
// windows they have; every stream always has its initial window, so none is
// starved. The zero value is a budget of flowBudgetSize. A flowBudget is safe
// for concurrent use.
type flowBudget struct {
	limit int64            // the budget in bytes; zero means flowBudgetSize. Fixed before first use
	now   func() time.Time // the clock for window growth; nil means time.Now. Fixed before first use (tests)

	reserved atomic.Int64 // window growth reserved by the streams
	held     atomic.Int64 // what the kindData frames received and not yet consumed cost, all streams together
	peak     atomic.Int64 // the most held has been
}

// size returns the budget in bytes.
func (b *flowBudget) size() int64 {
	if b.limit == 0 {
		return flowBudgetSize
	}
	return b.limit
}

// reserve takes n bytes from the budget and reports whether it could: it
// takes nothing if fewer than n are left.
func (b *flowBudget) reserve(n int) bool {
	limit := b.size()
	for {
		r := b.reserved.Load()
		if r+int64(n) > limit {
			return false
		}
		if b.reserved.CompareAndSwap(r, r+int64(n)) {
			return true
		}
	}
}

// release returns n bytes that reserve took.
func (b *flowBudget) release(n int) { b.reserved.Add(-int64(n)) }

// hold records n bytes of cost received, and unhold n bytes consumed or
// dropped, for held and peak.
func (b *flowBudget) hold(n int) {
	h := b.held.Add(int64(n))
	for {
		p := b.peak.Load()
		if h <= p || b.peak.CompareAndSwap(p, h) {
			return
		}
	}
}

func (b *flowBudget) unhold(n int) { b.held.Add(-int64(n)) }

func (b *flowBudget) clock() time.Time {
	if b.now != nil {
		return b.now()
	}
	return time.Now()
}

// errWindowExceeded reports a sender that sent more body than the receiver
// granted it.
var errWindowExceeded = errors.New("body exceeds the flow-control window")

// A recvWindow is a receiver's account of one stream's window in one
// direction: the credit granted to the sender and the body received, which
// check that the sender stays within its grant; what is held and owed; and
// the window's size, which it grows, with credit from the budget, while the
// stream drains quickly. Its zero value is not usable: call init. It is
// guarded by its owner's mutex (stream.mu, bodyReader.mu).
type recvWindow struct {
	budget   *flowBudget // fixed; nil means no growth and no accounting
	size     int         // the window: initialWindow plus the growth reserved from budget
	granted  int64       // credit granted in all: the initial credit and every update
	received int64       // what every kindData frame received cost
	held     int         // cost received and not yet consumed or dropped
	owed     int         // cost consumed and not yet granted back
	epoch    time.Time   // when the last update was granted, or the first frame arrived
	released bool        // the stream has ended: growth and held are returned
}

// init prepares w with the credit the sender starts with (initialWindow, or
// 0 when the receiver grants it later: see grantInitial).
func (w *recvWindow) init(budget *flowBudget, credit int) {
	*w = recvWindow{budget: budget, size: initialWindow, granted: int64(credit)}
}

// grantInitial grants the initial window that init withheld, and returns the
// credit to send.
func (w *recvWindow) grantInitial() int {
	w.granted += initialWindow
	return initialWindow
}

// receive records a frame of the given cost, and fails if it is more than
// the sender was granted. A frame received after the stream was released is
// checked, not held.
func (w *recvWindow) receive(cost int) error {
	if w.received+int64(cost) > w.granted {
		return errWindowExceeded
	}
	w.received += int64(cost)
	if w.released {
		return nil
	}
	w.held += cost
	if w.budget != nil {
		w.budget.hold(cost)
		if w.epoch.IsZero() {
			w.epoch = w.budget.clock()
		}
	}
	return nil
}

// consume records that cost received has been consumed, and returns the
// credit to grant back to the sender now, 0 for none yet. Credit goes back
// once half the window is owed: a small body then costs no window update at
// all, and a sender never waits for credit that is held back, since it may
// send what credit it has (no sender waits for a whole chunk's worth).
//
// idle reports that nothing received is waiting to be consumed. If so, and
// the stream consumed what it returns fast enough (see growPeriod), the
// window doubles, up to window, with credit reserved from the budget; the
// extra credit goes with the update.
func (w *recvWindow) consume(cost int, idle bool) int {
	if w.released {
		return 0
	}
	w.held -= cost
	w.owed += cost
	if w.budget != nil {
		w.budget.unhold(cost)
	}
	if w.owed < w.size/2 {
		return 0
	}
	n := w.owed
	w.owed = 0
	if w.budget != nil {
		now := w.budget.clock()
		fast := now.Sub(w.epoch) < growPeriod*time.Duration(n)/time.Duration(w.size)
		if idle && fast && w.size < window {
			extra := min(w.size, window-w.size)
			if w.budget.reserve(extra) {
				w.size += extra
				n += extra
			}
		}
		w.epoch = now
	}
	w.granted += int64(n)
	return n
}

// release returns the stream's growth to the budget and drops what it
// holds; the stream has ended and its receiver drops what it had queued.
// It may be called more than once.
func (w *recvWindow) release() {
	if w.released {
		return
	}
	w.released = true
	if w.budget != nil {
		w.budget.unhold(w.held)
		w.budget.release(w.size - initialWindow)
	}
	w.held = 0
}

// A bodyReader is a request body as the child's handler sees it. The child's
// readLoop pushes the parent's kindData chunks into it; the handler reads
// them, and what it has read is granted back to the parent (see recvWindow).
// It never holds more than the stream's window, which grows, from the
// child's flowBudget, while the handler reads quickly.
type bodyReader struct {
	grant   func(n int)   // sends a window update to the parent; fixed
	trailer *http.Header  // the request's Trailer field, merged into at the end (nil: none); set before the handler runs
	wake    chan struct{} // capacity 1; signalled on every change

	mu     sync.Mutex // guards the fields below
	chunks []chunk    // queued chunks; the first is read from off
	costs  []int      // what each queued chunk costs against the window: several frames, when small ones were appended to it (see push)
	off    int
	queued int         // what the queued chunks cost against the window
	recv   recvWindow  // the window granted to the parent
	err    error       // returned once the queue is empty: io.EOF at the end
	ended  http.Header // the trailers that came with the end, until a read merges them
	closed bool        // the handler closed the body, or returned
	expect bool        // the parent waits for a first read before sending (Expect: 100-continue)
	taken  int64       // body bytes the handler has read

	expectReq bool // fixed: the request asked for 100-continue

	// deadline, if set, returns a channel closed when the handler's read
	// deadline (http.ResponseController.SetReadDeadline) passes; fixed
	// before the handler runs.
	deadline func() <-chan struct{}
}

// newBodyReader returns the body of a request whose window updates grant
// sends, with growth from budget (nil: none). With expectContinue the
// parent sends nothing until the first Read grants the initial window.
func newBodyReader(grant func(int), expectContinue bool, budget *flowBudget) *bodyReader {
	b := &bodyReader{grant: grant, expect: expectContinue, expectReq: expectContinue, wake: make(chan struct{}, 1)}
	credit := initialWindow
	if expectContinue {
		credit = 0
	}
	b.recv.init(budget, credit)
	return b
}

// errBodyWindow reports a parent that sent more body than the window allows.
var errBodyWindow = errors.New("request body exceeds the flow-control window")

// push queues a chunk, and takes ownership of it.
func (b *bodyReader) push(c chunk) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.recv.receive(frameCost(c.n)); err != nil {
		c.release()
		return errBodyWindow
	}
	if b.closed || b.err != nil {
		b.recv.consume(frameCost(c.n), false) // dropped: the parent need not get the credit back
		c.release()
		return nil
	}
	b.queued += frameCost(c.n)
	if k := len(b.chunks); k > 0 && b.chunks[k-1].absorb(c) {
		b.costs[k-1] += frameCost(c.n)
		b.signal()
		return nil
	}
	b.chunks = append(b.chunks, c)
	b.costs = append(b.costs, frameCost(c.n))
	b.signal()
	return nil
}

// end ends the body with err (io.EOF for a complete body) and, for a
// complete body, keeps trailer for the read that returns io.EOF to merge
// into the request's (see waitLocked).
func (b *bodyReader) end(err error, trailer http.Header) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return
	}
	b.ended = trailer
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
// After the handler's read deadline it fails with os.ErrDeadlineExceeded.
func (b *bodyReader) Read(p []byte) (int, error) {
	if b.deadline == nil {
		return b.read(p, nil)
	}
	n, err := b.read(p, b.deadline())
	if err == errCanceled {
		err = &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	}
	return n, err
}

// read is Read, giving up with errCanceled when cancel is closed.
func (b *bodyReader) read(p []byte, cancel <-chan struct{}) (int, error) {
	if err := b.waitLocked(cancel); err != nil {
		return 0, err
	}
	n, consumed := 0, 0
	for n < len(p) && len(b.chunks) > 0 {
		c := &b.chunks[0]
		k := copy(p[n:], c.data()[b.off:])
		n += k
		b.off += k
		if b.off == c.n {
			consumed += b.costs[0]
			c.release()
			b.chunks, b.costs, b.off = b.chunks[1:], b.costs[1:], 0
		}
	}
	b.taken += int64(n)
	b.consumeLocked(consumed)
	return n, nil
}

// WriteTo writes the body to w until its end, chunk by chunk, as they
// arrive: io.Copy calls it, which saves a copy into io.Copy's buffer. It
// fails as Read does, or with w's error, and returns nil at the body's end.
func (b *bodyReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		var cancel <-chan struct{}
		if b.deadline != nil {
			cancel = b.deadline()
		}
		if err := b.waitLocked(cancel); err != nil {
			switch err {
			case io.EOF:
				return total, nil
			case errCanceled:
				err = &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
			}
			return total, err
		}
		c, off, cost := b.chunks[0], b.off, b.costs[0]
		b.chunks[0] = chunk{}
		b.chunks, b.costs, b.off = b.chunks[1:], b.costs[1:], 0
		b.taken += int64(c.n - off)
		b.consumeLocked(cost)
		n, err := c.writeTo(w, off)
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
}

// waitLocked waits until a chunk is queued, and returns with b.mu held;
// else, with b.mu released, it returns the body's end or error, the
// failure of a read after Close, or errCanceled when cancel is closed.
func (b *bodyReader) waitLocked(cancel <-chan struct{}) error {
	b.mu.Lock()
	if b.expect {
		// The parent sends nothing of an Expect: 100-continue body until
		// the handler first reads it, as net/http sends "100 Continue".
		b.expect = false
		n := b.recv.grantInitial()
		b.mu.Unlock()
		b.grant(n)
		b.mu.Lock()
	}
	for len(b.chunks) == 0 && b.err == nil && !b.closed {
		b.mu.Unlock()
		select {
		case <-b.wake:
		case <-cancel:
			return errCanceled
		}
		b.mu.Lock()
	}
	if b.closed {
		b.mu.Unlock()
		return http.ErrBodyReadAfterClose
	}
	if len(b.chunks) == 0 {
		err := b.err
		if err == io.EOF && b.ended != nil {
			b.mergeTrailerLocked()
		}
		b.mu.Unlock()
		return err
	}
	return nil
}

// mergeTrailerLocked merges the trailers that came with the body's end
// into the request's, as net/http does in the read that returns io.EOF, on
// the handler's goroutine: every field the client sent, declared or not.
func (b *bodyReader) mergeTrailerLocked() {
	if b.trailer != nil {
		if *b.trailer == nil {
			*b.trailer = make(http.Header, len(b.ended))
		}
		for k, v := range b.ended {
			(*b.trailer)[k] = v
		}
	}
	b.ended = nil
}

// consumeLocked records that chunks costing consumed were taken from the
// queue, releases b.mu, and grants the parent the credit due, if any.
func (b *bodyReader) consumeLocked(consumed int) {
	grant := 0
	if consumed > 0 {
		b.queued -= consumed
		grant = b.recv.consume(consumed, len(b.chunks) == 0)
		if b.err != nil {
			grant = 0 // the body has ended: the parent sends no more
		}
	}
	b.mu.Unlock()
	if grant > 0 {
		b.grant(grant)
	}
}

// answered applies net/http's rule for the body of an HTTP/1 request, of
// contentLength bytes (-1: unknown), as the head of its response goes out
// and its handler is not in full-duplex mode (see net/http's
// chunkWriter.writeHeader). It reports true if the handler may read on:
// net/http lets it when 256 KiB or more of a body of known length is left,
// and leaves an Expect: 100-continue body it has not read to its end, and
// then closes the connection after the response. Otherwise it closes b,
// as net/http discards what is left: later reads fail with
// http.ErrBodyReadAfterClose, whatever arrives meanwhile.
func (b *bodyReader) answered(contentLength int64) (keep bool) {
	b.mu.Lock()
	closed, complete, taken := b.closed, b.err == io.EOF && len(b.chunks) == 0, b.taken
	b.mu.Unlock()
	switch {
	case closed:
		return false
	case b.expectReq:
		return !complete // read to its end, it goes on returning io.EOF
	case contentLength > 0 && contentLength-taken >= maxPostHandlerReadBytes:
		return true
	}
	b.Close()
	return false
}

// Close discards what is queued and returns the window's growth to the
// budget; later reads fail.
func (b *bodyReader) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for i := range b.chunks {
		b.chunks[i].release()
	}
	b.chunks, b.costs, b.queued = nil, nil, 0
	b.recv.release()
	b.signal()
	return nil
}

var _ io.ReadCloser = (*bodyReader)(nil)

// A stream is the parent's side of one request sent to a child: the
// response messages the child's readLoop delivers, queued for the request's
// goroutine, the response's window, and the credit for sending the request
// body.
type stream struct {
	id          uint64        // fixed
	bodyTouched atomic.Bool   // the request body has been read from
	win         sendWindow    // request-body credit granted by the child
	wake        chan struct{} // capacity 1; signalled on every push and on failure
	x           exchange      // the request's exchange, allocated with the stream (see proxy); owned by ServeHTTP

	mu        sync.Mutex // guards the fields below
	events    []event
	inline    [4]event    // events' first backing array: most responses fit
	queued    int         // what the kindData events cost against the window
	recv      recvWindow  // the response's window, granted to the child
	informal  int         // 1xx response heads received
	infoHeld  int         // what the queued 1xx heads cost (see informationalCost)
	heads     *flowBudget // fixed at open; the module's budget for large heads and trailers, nil for none (see chargeHeadLocked)
	headsHeld int         // what the stream has reserved from heads
	final     bool        // the final (non-1xx) response head has arrived
	ended     bool        // kindEnd or kindAbort has arrived: the child is done with the stream (on a tunnel, kindAbort only)
	tunnel    bool        // kindHijack has arrived: the stream carries a hijacked connection's bytes (see PROTOCOL.md)
	wclosed   bool        // on a tunnel, the child's kindEnd has arrived: it sends no more data
	hijackOK  bool        // fixed at open: the request was sent as hijackable (requestHead.Hijackable)
	err       error       // the stream failed: the child can no longer answer
	abandoned bool        // the request's goroutine has gone; what arrives is dropped

	// What cutWrites interrupts, guarded by cutMu: the writes of the
	// request's goroutine to its client, which wait for a client that
	// reads slowly, or not at all, and then see nothing else.
	cutMu   sync.Mutex
	cutW    http.ResponseWriter // once the response has started: where it is written
	cutConn net.Conn            // once the stream is a tunnel: the client's hijacked connection
	cutAt   time.Time           // the write deadline cutWrites set; zero until it is called
	cutOff  bool                // the request's goroutine is done with the client: nothing is cut
}

// An event is one message of a response, in the order the child sent it.
type event struct {
	kind  uint8
	flags uint8
	// cost is what a kindData event costs against the window when it
	// holds several frames (see stream.pushEvent); 0 for one frame. For a
	// kindResponse or kindEnd, what its head or trailers cost decoded (see
	// stream.chargeHeadLocked); for an abort with flagOverBudget, what the
	// head or trailers it replaced did. (An int32, in the padding after
	// flags: streams hold four events inline.)
	cost    int32
	head    *responseHead // kindResponse
	chunk                 // kindData: the bytes, owned by the receiver of the event
	trailer http.Header   // kindEnd
}

// charge returns what a kindData event costs against the window.
func (ev *event) charge() int {
	if ev.cost > 0 {
		return int(ev.cost)
	}
	return frameCost(ev.n)
}

// A chunk is body bytes in a pooled buffer or in a slot of a bodyRing: as
// received in a kindData frame (a slot from a kindDataRef), or as a sender
// fills them (see conn.takeSlot).
type chunk struct {
	slot int32     // ring's slot
	buf  *[]byte   // a pooled buffer; nil if ring is set
	ring *bodyRing // the ring whose slot holds the bytes; nil if buf is set
	n    int       // bytes in buf or slot
}

// data returns the chunk's bytes, which are valid until release.
func (c *chunk) data() []byte { return c.space()[:c.n] }

// space returns all of the chunk's buffer or slot: a sender fills it.
func (c *chunk) space() []byte {
	if c.ring != nil {
		return c.ring.slot(int(c.slot))
	}
	if c.buf == nil {
		return nil
	}
	return *c.buf
}

// writeTo writes the chunk's bytes from off to w, then releases the chunk,
// even if w panics.
func (c *chunk) writeTo(w io.Writer, off int) (int, error) {
	defer c.release()
	return w.Write(c.data()[off:])
}

// absorb appends the bytes of d, a chunk queued after c, to c's buffer and
// releases d, if both are in pooled buffers and c's has room; it reports
// whether it did. Small frames that wait for a slow reader are so held in
// one buffer: else each would hold a pooled buffer of smallChunk bytes or
// more for its few bytes, 16 times what the window charges a one-byte
// frame.
func (c *chunk) absorb(d chunk) bool {
	if c.buf == nil || d.buf == nil || len(*c.buf)-c.n < d.n {
		return false
	}
	copy((*c.buf)[c.n:], d.data())
	c.n += d.n
	d.release()
	return true
}

// unshare moves the chunk's bytes out of a ring's slot, which the other
// process can read and write, into a pooled buffer, and gives the slot
// back. The parent does so before it hands the bytes to a writer that may
// do more than copy them (see serverWriter and plainConn). It does nothing
// for a chunk in a buffer.
func (c *chunk) unshare() {
	if c.ring == nil {
		return
	}
	b := getBuffer(c.n)
	copy(*b, c.data())
	c.ring.free(int(c.slot))
	c.ring, c.buf = nil, b
}

// release returns the chunk's buffer, or ring slot, for reuse. It does
// nothing for a chunk released already, or a zero one.
func (c *chunk) release() {
	if c.ring != nil {
		c.ring.free(int(c.slot))
		c.ring = nil
	}
	putChunk(c.buf)
	c.buf = nil
}

// newStream returns a stream whose request body may start with credit bytes.
// Its response window does not grow until the caller, before it shares the
// stream, sets recv.budget.
func newStream(id uint64, credit int) *stream {
	s := &stream{id: id, wake: make(chan struct{}, 1)}
	s.win.init(credit)
	s.recv.init(nil, initialWindow)
	s.events = s.inline[:0]
	return s
}

// push queues an event from the child. It returns an error, and queues
// nothing, if the event breaks the protocol: a response after the final one,
// body before the response, more body than the window, or too many events.
// It takes ownership of ev's buffer or slot.
func (s *stream) push(ev event) error {
	err := s.pushEvent(ev)
	if err == nil && ev.kind == kindAbort {
		// The response ends aborted (a tunnel, when its handler closed
		// its conn). What came before it still goes, to a client that
		// takes it in time: a response flushed before a panic, a
		// WebSocket's close message.
		s.cutWritesAt(time.Now().Add(abortLinger))
	}
	return err
}

// abortLinger is how long what a response holds has to reach its client
// once the child has aborted it or died: a client that reads nothing
// would otherwise hold the parent's goroutine, and its admission, for ever.
const abortLinger = time.Second

// pushEvent is push without the cut.
func (s *stream) pushEvent(ev event) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.checkLocked(ev)
	if err != nil || s.abandoned || s.err != nil {
		if err == nil && ev.kind == kindData {
			s.recv.consume(frameCost(ev.n), false) // dropped
		}
		ev.release()
		return err
	}
	if n := informationalCost(ev); n > 0 {
		if s.infoHeld > 0 && s.infoHeld+n > maxHeldInformational || !s.chargeHeadLocked(ev) {
			// The request's goroutine has not taken the earlier ones
			// yet: the client is slow, or the handler sends 1xx heads
			// faster than any client takes them. Or the module's other
			// responses hold its head budget. Informational, and
			// dropped, as the child drops those past maxInformational.
			ev.release()
			return nil
		}
		s.infoHeld += n
	} else if (ev.kind == kindResponse || ev.kind == kindEnd) && !s.chargeHeadLocked(ev) {
		// The module's other responses hold its head budget, for
		// clients that read slowly: this response fails (see
		// exchange.abort), and its head or trailers are dropped.
		ev = event{kind: kindAbort, flags: flagOverBudget, cost: ev.cost}
	}
	if ev.kind == kindData {
		s.queued += frameCost(ev.n)
		if k := len(s.events); k > 0 && s.events[k-1].kind == kindData {
			last := &s.events[k-1]
			if cost := last.charge(); last.absorb(ev.chunk) {
				last.cost = int32(cost + frameCost(ev.n)) // at most a window
				last.flags |= ev.flags
				s.signal()
				return nil
			}
		}
	}
	s.events = append(s.events, ev)
	s.signal()
	return nil
}

// chargeHeadLocked reserves what ev, a response head or trailers, cost
// decoded from the module's head budget, if that is more than
// freeHeadCost, for as long as the request's exchange may hold them: until
// it has written a 1xx head (uncharge), else until it ends
// (releaseHeads). It reports false, having reserved nothing, if the
// budget cannot hold them.
func (s *stream) chargeHeadLocked(ev event) bool {
	n := s.headCharge(ev)
	if n == 0 {
		return true
	}
	if !s.heads.reserve(n) {
		return false
	}
	s.headsHeld += n
	return true
}

// headCharge returns what ev, a response head or trailers, is charged to
// the head budget: what it cost decoded, if that is more than
// freeHeadCost; else 0.
func (s *stream) headCharge(ev event) int {
	if n := int(ev.cost); n > freeHeadCost && s.heads != nil {
		return n
	}
	return 0
}

// uncharge returns what chargeHeadLocked reserved for ev, a 1xx head that
// the request's exchange has written, or dropped.
func (s *stream) uncharge(ev event) {
	n := s.headCharge(ev)
	if n == 0 {
		return
	}
	s.mu.Lock()
	s.headsHeld -= n
	s.mu.Unlock()
	s.heads.release(n)
}

// releaseHeads returns what the stream reserved from the head budget: its
// exchange has ended, and holds its heads and trailers no more.
func (s *stream) releaseHeads() {
	s.mu.Lock()
	n := s.headsHeld
	s.headsHeld = 0
	s.mu.Unlock()
	if n > 0 {
		s.heads.release(n)
	}
}

// maxHeldInformational bounds what the 1xx heads that a stream holds cost
// (see push): a handler may send maxInformational of them, each as large as
// maxHeadSize, as fast as it likes, while the client reads nothing. A
// stream holds at least one.
const maxHeldInformational = 64 << 10

// informationalCost returns what ev costs held if it is a 1xx head (bounded
// by its size on the wire and decoded: see wireSize), else 0.
func informationalCost(ev event) int {
	if ev.kind != kindResponse || ev.head.Status >= 200 || ev.head.Status == http.StatusSwitchingProtocols {
		return 0
	}
	return ev.head.wireSize()
}

// consume records that the request's goroutine has written a kindData event
// of n bytes to the client, and returns the credit to grant back to the
// child now, if any (see recvWindow.consume). The stream drains quickly if
// nothing more is queued by then. Once the response's end has arrived, the
// child needs no more credit: none is returned, which spares most responses
// of more than half a window their only window update.
func (s *stream) consume(n int) int { return s.consumeCost(frameCost(n)) }

// consumeCost is consume for an event that cost cost against the window
// (see event.charge).
func (s *stream) consumeCost(cost int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	grant := s.recv.consume(cost, len(s.events) == 0)
	if s.ended {
		return 0
	}
	return grant
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
	case kindHijack:
		// Before the final head, or after it, the response started (see
		// PROTOCOL.md, "Hijack in the child").
		if !s.hijackOK {
			// The child's Hijack fails for such a request.
			return errors.New("hijack of a request the parent cannot hijack")
		}
		if s.tunnel {
			return errors.New("second hijack")
		}
		s.final, s.tunnel = true, true
	case kindData:
		if !s.final {
			return errors.New("response body before the response head")
		}
		if s.wclosed {
			return errors.New("tunnel data after its end")
		}
		if err := s.recv.receive(frameCost(ev.n)); err != nil {
			return errors.New("response body exceeds the flow-control window")
		}
	case kindEnd:
		if !s.final {
			return errors.New("end of response before the response head")
		}
		if s.tunnel {
			// A half-close: the stream ends with kindAbort.
			if s.wclosed {
				return errors.New("second end of a tunnel")
			}
			s.wclosed = true
			break
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
	if s.err == nil {
		s.err = err
		s.signal()
	}
	s.win.close(err)
	s.mu.Unlock()
	s.cutWritesAt(time.Now().Add(abortLinger)) // the response can only end aborted
}

// armCut records where the request's goroutine writes to its client, once
// the response has started (w) or the stream has become a tunnel (conn):
// what cutWrites interrupts. If the stream was cut already, it cuts again.
func (s *stream) armCut(w http.ResponseWriter, conn net.Conn) {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	if s.cutOff {
		return
	}
	s.cutW, s.cutConn = w, conn
	if !s.cutAt.IsZero() {
		s.interruptLocked()
	}
}

// cutWrites makes the writes of the request's goroutine to its client
// fail, the one that waits now and every later one, by a write deadline in
// the past: the child's drain ended, or the request's deadline passed (at
// the child's abort or death, cutWritesAt gives them abortLinger). The
// goroutine then sees the stream's events, which end the response
// aborted.
func (s *stream) cutWrites() { s.cutWritesAt(cutNow) }

// cutNow is the deadline cutWrites sets: one long past.
var cutNow = time.Unix(1, 0)

// cutAtOnce reports whether cutWrites cut the stream (at a drain's end,
// or at the request's deadline once the response started), not only
// cutWritesAt with abortLinger.
func (s *stream) cutAtOnce() bool {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	return s.cutAt.Equal(cutNow)
}

// cutWritesAt is cutWrites at deadline t, unless an earlier one was set.
// Safe for concurrent use; once disarmCut has returned it does nothing, so
// that it never touches a connection that has gone on to its next request.
func (s *stream) cutWritesAt(t time.Time) {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	if s.cutOff || !s.cutAt.IsZero() && !t.Before(s.cutAt) {
		return
	}
	s.cutAt = t
	s.interruptLocked()
}

// interruptLocked sets the write deadline to cutAt; a ResponseWriter that
// cannot take one (http.ErrNotSupported) is left as it is.
func (s *stream) interruptLocked() {
	switch {
	case s.cutConn != nil:
		s.cutConn.SetWriteDeadline(s.cutAt)
	case s.cutW != nil:
		http.NewResponseController(s.cutW).SetWriteDeadline(s.cutAt)
	}
}

// wasCut reports whether cutWrites or cutWritesAt was called.
func (s *stream) wasCut() bool {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	return !s.cutAt.IsZero()
}

// disarmCut ends what cutWrites may touch: the request's goroutine is done
// with its client. It waits for a cut under way.
func (s *stream) disarmCut() {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	s.cutOff = true
	s.cutW, s.cutConn = nil, nil
}

// abandon drops what is queued and whatever arrives later, and returns the
// response window's growth to the budget; the request's goroutine calls it
// when it stops reading.
func (s *stream) abandon() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.abandoned = true
	for i := range s.events {
		s.events[i].release()
	}
	s.events, s.queued, s.infoHeld = nil, 0, 0
	s.recv.release()
}

// tunneled reports whether the stream is a tunnel: its child's kindEnd
// does not end it.
func (s *stream) tunneled() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tunnel
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

// next returns the next event, waiting for one. A kindData event's bytes
// count against the window until consume is called for them, or the stream
// ends. Once the queue is empty, a failed stream returns its error. cancel interrupts the wait with
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
			switch ev.kind {
			case kindData:
				s.queued -= ev.charge()
			case kindResponse:
				s.infoHeld -= informationalCost(ev)
			case kindEnd, kindAbort:
				// The last event: the response needs its window no more.
				s.recv.release()
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
