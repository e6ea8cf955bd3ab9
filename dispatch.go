package subproc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/fbbf71ac/subproc/internal/logcapture"
)

// This file holds what moves messages: the write side of a conn, which both
// parent and child use, and the parent's readLoop, which decodes the
// child's frames and hands each to the stream it belongs to.

// Sizes of the buffers on each pipe. A sender waits while maxPending bytes
// of frames are waiting to be written. The reader's buffer holds a chunk:
// most payloads are copied out of it (bufio reads straight into the
// caller's buffer only when its own is empty and the caller's is at least
// as large); a buffer of a quarter chunk, which would let more of a
// chunk's payload be read straight into its own buffer, measured no
// faster.
const (
	maxPending     = 4 * chunkSize
	readBufferSize = chunkSize
)

// An outFrame is a frame to send.
type outFrame struct {
	kind  uint8
	flags uint8
	id    uint64
	msg   any    // if non-nil, encoded as the payload (see encoder)
	data  []byte // the payload otherwise
	// out holds data: a pooled buffer, released once data is copied, or,
	// for kindData, a slot of sendRing that data starts, which goes by
	// reference (see conn.takeSlot); zero for neither.
	out chunk
}

// errConnClosed reports a send on a connection that stopped writing.
var errConnClosed = errors.New("connection closed")

// A conn is one side's end of the pipes between parent and child.
//
// Writes are combined, without a goroutine of their own: a sender appends
// its frames to the pending bytes and, if no other sender is writing to the
// pipe, writes them itself, then whatever others appended meanwhile, until
// nothing is pending. A lone request or answer thus goes out at once, with
// no hand-off to another goroutine, which would be most of a round trip's
// latency; under load, the frames of many senders share a write. Frames
// reach the pipe in the order they were appended.
//
// In the parent no sender waits for the child to read (see tryWrites): a
// sender that finds the pipe full leaves the rest to writeLoop. A child
// that reads nothing, frozen or hung, thus holds no request's goroutine:
// each waits only while maxPending bytes are pending, and its cancel
// ends that wait.
type conn struct {
	quit     chan struct{} // closed by stopWriting
	quitOnce sync.Once
	wdone    chan struct{} // closed when writeLoop has flushed and closed the pipe

	mu      sync.Mutex // guards the fields below
	w       io.WriteCloser
	pending []byte        // frames not yet written
	spare   []byte        // the buffer the writer last wrote, for reuse
	writing bool          // a sender, or writeLoop, is writing pending to the pipe
	handoff bool          // a sender found the pipe full: writing is writeLoop's (see writeLocked)
	drained chan struct{} // made by a sender that must wait; closed, and cleared, when a writer has written what was pending
	enc     *encoder
	werr    error // once set, nothing more is written: the pipe failed or is closed

	// broken is closed when a write to the pipe has failed: what it held
	// and whatever is sent later is lost.
	broken chan struct{}

	// try, if not nil, writes to the pipe without waiting (the parent's:
	// see tryWrites); kick, of capacity 1, then tells writeLoop to write
	// what a sender left in pending when the pipe was full.
	try  *tryWriter
	kick chan struct{}

	fr  *frame.Reader // owned by the reading goroutine
	dec *decoder      // owned by the reading goroutine

	// sendRing is where the bytes of kindData frames of at least ringMin
	// bytes go while it has a free slot, copied by appendLocked or filled
	// in place (see takeSlot): the up ring in a child, the down ring in
	// the parent; nil for none. Its take is guarded by mu.
	sendRing *bodyRing
	// readSlots counts the slots of sendRing taken by takeReadSlot whose
	// reads have not returned.
	readSlots atomic.Int32
}

func newConn(r io.Reader, w io.WriteCloser) *conn {
	return &conn{
		quit:    make(chan struct{}),
		wdone:   make(chan struct{}),
		broken:  make(chan struct{}),
		kick:    make(chan struct{}, 1),
		w:       w,
		pending: frame.AppendPreamble(make([]byte, 0, 4<<10), protocolVersion),
		enc:     newEncoder(),
		fr:      frame.NewReader(r, readBufferSize),
		dec:     newDecoder(),
	}
}

// send sends f; see sendFrames.
func (c *conn) send(f outFrame, cancel <-chan struct{}) error {
	fs := [1]outFrame{f}
	return c.sendFrames(fs[:], cancel)
}

// sendFrames sends frames in order, and together: no other sender's frame
// comes between them. It waits while maxPending bytes are waiting to be
// written; it fails, releasing the chunks of fs and sending none of them, if
// the pipe had failed, the conn had stopped writing, or cancel is closed
// first. Once it has taken the frames it returns nil: it may return before
// they are in the pipe (another sender, or writeLoop, may be writing
// them), and a write that fails after that is not reported to it. The
// caller may end up writing to the pipe itself, which cancel does not
// interrupt; in the parent that write never waits for the child.
func (c *conn) sendFrames(fs []outFrame, cancel <-chan struct{}) error {
	c.mu.Lock()
	for c.werr == nil && len(c.pending) >= maxPending {
		drained := c.waitDrainedLocked()
		c.mu.Unlock()
		select {
		case <-drained:
		case <-cancel:
			releaseFrames(fs)
			return errCanceled
		}
		c.mu.Lock()
	}
	if c.werr != nil {
		err := c.werr
		c.mu.Unlock()
		releaseFrames(fs)
		return err
	}
	for i, f := range fs {
		if err := c.appendLocked(f); err != nil {
			c.werr = err
			c.mu.Unlock()
			releaseFrames(fs[i+1:])
			return err
		}
	}
	if !c.writing {
		// A write that fails may be of frames appended after ours, which
		// are then in the pipe: the failure is not ours to report. The
		// peer's end of the pipes reports it (for the parent, through the
		// accept word), and later sends see it.
		c.writeLocked(false)
	}
	c.mu.Unlock()
	return nil
}

// post sends f, a frame of a few bytes that the peer must get, such as a
// cancel, even while maxPending bytes are pending: the caller bounds how
// many it posts. It drops f if the pipe had failed or the conn had stopped
// writing. It waits for the peer only where sendFrames would: never in
// the parent.
func (c *conn) post(f outFrame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.werr != nil {
		f.out.release()
		return
	}
	if err := c.appendLocked(f); err != nil {
		c.werr = err
		return
	}
	if !c.writing {
		c.writeLocked(false)
	}
}

// queue appends f to what is pending without writing it: for a conn whose
// writeLoop has not started, which then writes it after the preamble, on
// its own goroutine. (A first message larger than the pipe holds would
// otherwise hold its sender until the peer reads it, which a peer that
// hangs before it reads anything never does.)
func (c *conn) queue(f outFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.appendLocked(f); err != nil {
		c.werr = err
		return err
	}
	return nil
}

// waitDrainedLocked returns a channel that is closed when the writer has
// next written what was pending. It is made only when a sender must wait,
// so that a write costs no allocation.
func (c *conn) waitDrainedLocked() <-chan struct{} {
	if c.drained == nil {
		c.drained = make(chan struct{})
	}
	return c.drained
}

// writeLocked writes what is pending, and what others append meanwhile,
// until nothing is. c.mu is held, but not while writing to the pipe.
//
// Unless wait is set (writeLoop's writes), a conn with try writes without
// waiting: if the pipe is full, what is left stays pending, first, and
// writeLocked hands the writing to writeLoop (handoff) and returns.
func (c *conn) writeLocked(wait bool) error {
	c.writing = true
	for len(c.pending) > 0 && c.werr == nil {
		out := c.pending
		c.pending = c.spare[:0]
		c.mu.Unlock()
		var n int
		var err error
		if c.try != nil && !wait {
			n, err = c.try.write(out)
		} else {
			n, err = c.w.Write(out)
		}
		c.mu.Lock()
		if err == nil && n < len(out) {
			rest := append(out[:0], out[n:]...)
			c.spare, c.pending = c.pending[:0], append(rest, c.pending...)
			if c.drained != nil {
				close(c.drained) // waiters look again: there may be room
				c.drained = nil
			}
			c.handoff = true // writing stays set: it is writeLoop's
			select {
			case c.kick <- struct{}{}:
			default:
			}
			return nil
		}
		if cap(out) <= 2*maxPending { // keep a buffer of reasonable size
			c.spare = out[:0]
		} else {
			// Else the spare would still be the buffer that is now
			// pending, and the next write's from it, while senders
			// append to it.
			c.spare = nil
		}
		if err != nil {
			c.werr = err // so this is the loop's last write, and the pipe's
			close(c.broken)
		}
		if c.drained != nil {
			close(c.drained)
			c.drained = nil
		}
	}
	c.writing = false
	return c.werr
}

// A tryWriter writes to a pipe that is in non-blocking mode, once, without
// waiting for room (see conn.try): what does not fit is for a later write.
type tryWriter struct {
	rc  syscall.RawConn
	fn  func(fd uintptr) bool // attempt, bound once: a write allocates nothing
	p   []byte                // the attempt's bytes, and what it did
	n   int
	err error
}

// tryWrites makes c write to f, the parent's end of a pipe to a child,
// without waiting for the child to read (see conn.try). The pipe is f from
// os.Pipe, which is in non-blocking mode.
func (c *conn) tryWrites(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	t := &tryWriter{rc: rc}
	t.fn = t.attempt
	c.try = t
}

// write writes what of p the pipe has room for, and returns how much;
// only a failed write returns an error.
func (t *tryWriter) write(p []byte) (int, error) {
	t.p = p
	err := t.rc.Write(t.fn)
	n := t.n
	if err == nil {
		err = t.err
	}
	t.p, t.err = nil, nil
	return n, err
}

func (t *tryWriter) attempt(fd uintptr) bool {
	for {
		n, err := syscall.Write(int(fd), t.p)
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			n, err = 0, nil
		case nil:
		default:
			n = 0
			err = &os.PathError{Op: "write", Path: "pipe", Err: err}
		}
		t.n, t.err = n, err
		return true // done: no waiting for room
	}
}

// releaseFrames releases the buffers and slots of frames that will not be
// sent.
func releaseFrames(fs []outFrame) {
	for i := range fs {
		fs[i].out.release()
	}
}

// takeSlot takes a free slot of sendRing, as an empty chunk, for the caller
// to fill and send as a frame's out, or to release; it reports false if
// there is no ring or no free slot. The bytes then go without a copy.
func (c *conn) takeSlot() (chunk, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sendRing == nil {
		return chunk{}, false
	}
	i := c.sendRing.take()
	if i < 0 {
		return chunk{}, false
	}
	return chunk{ring: c.sendRing, slot: int32(i)}, true
}

// maxReadSlots is how many of sendRing's slots reads from clients may
// hold at once (see takeReadSlot).
const maxReadSlots = ringSlots / 2

// takeReadSlot is takeSlot for a read from a client straight into the
// slot: the caller calls readSlotDone once that read returns. A client
// decides how long such a read takes, so at most maxReadSlots slots wait
// in reads: clients that stall their bodies cannot take the ring from the
// other requests.
func (c *conn) takeReadSlot() (chunk, bool) {
	if c.readSlots.Add(1) > maxReadSlots {
		c.readSlots.Add(-1)
		return chunk{}, false
	}
	slot, ok := c.takeSlot()
	if !ok {
		c.readSlots.Add(-1)
	}
	return slot, ok
}

// readSlotDone ends a read into a slot from takeReadSlot.
func (c *conn) readSlotDone() { c.readSlots.Add(-1) }

// appendLocked appends f to the pending bytes and releases its chunk.
func (c *conn) appendLocked(f outFrame) error {
	if f.out.ring != nil {
		// Filled in place: only the reference goes.
		c.pending = appendRef(c.pending, f.flags, f.id, int(f.out.slot), len(f.data))
		return nil
	}
	if f.msg != nil {
		// Encoded in place, after a header whose length is set once the
		// payload is there.
		start := len(c.pending)
		c.pending = frame.AppendHeader(c.pending, f.kind, f.flags, f.id, 0)
		var err error
		if c.pending, err = c.enc.appendPayload(c.pending, f.msg); err != nil {
			c.pending = c.pending[:start]
			return fmt.Errorf("encoding %T: %w", f.msg, err)
		}
		if err := frame.SetLength(c.pending[start:]); err != nil {
			// A message of megabytes, which its sender should have
			// refused (see maxHeadSize): a gob stream would now lack
			// a message the peer needs, so the conn carries no more.
			c.pending = c.pending[:start]
			return fmt.Errorf("%T: %w", f.msg, err)
		}
		return nil
	}
	if c.sendRing != nil && f.kind == kindData && len(f.data) >= ringMin {
		if i := c.sendRing.take(); i >= 0 {
			copy(c.sendRing.slot(i), f.data)
			c.pending = appendRef(c.pending, f.flags, f.id, i, len(f.data))
			f.out.release()
			return nil
		}
	}
	c.pending = frame.AppendHeader(c.pending, f.kind, f.flags, f.id, len(f.data))
	c.pending = append(c.pending, f.data...)
	f.out.release()
	return nil
}

// appendRef appends a kindDataRef frame for the n bytes in slot i.
func appendRef(b []byte, flags uint8, id uint64, i, n int) []byte {
	b = frame.AppendHeader(b, kindDataRef, flags, id, 8)
	b = binary.BigEndian.AppendUint32(b, uint32(i))
	return binary.BigEndian.AppendUint32(b, uint32(n))
}

// sendWindowUpdate sends a window update of n bytes for stream id.
func (c *conn) sendWindowUpdate(id uint64, n int, cancel <-chan struct{}) error {
	var b [4]byte
	return c.send(outFrame{kind: kindWindow, id: id, data: windowPayload(&b, n)}, cancel)
}

// stopWriting makes writeLoop write what is pending, close the pipe and
// return.
func (c *conn) stopWriting() {
	c.quitOnce.Do(func() { close(c.quit) })
}

// flush writes what is pending, the preamble first of all, unless a sender
// is writing it.
func (c *conn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.writing {
		c.writeLocked(true)
	}
}

// writeLoop writes the preamble, unless a sender already has, and then
// what senders hand it (see writeLocked), until stopWriting; then it
// writes what is pending, closes the pipe, and closes wdone. Later sends
// fail with errConnClosed.
func (c *conn) writeLoop() {
	c.flush()
	for quit := false; !quit; {
		select {
		case <-c.kick:
		case <-c.quit:
			quit = true
		}
		c.mu.Lock()
		for quit && c.writing && !c.handoff {
			drained := c.waitDrainedLocked()
			c.mu.Unlock()
			<-drained
			c.mu.Lock()
		}
		if c.handoff {
			c.handoff = false
			c.writeLocked(true)
		}
		if !quit {
			c.mu.Unlock()
		}
	}
	c.writeLocked(true)
	if c.werr == nil {
		c.werr = errConnClosed
	}
	c.w.Close()
	c.mu.Unlock()
	close(c.wdone)
}

// readChunk reads the payload of a kindData or kindDataRef frame whose
// header is hdr, and returns the body chunk it carries: in a pooled buffer,
// or in the slot of r, the receiving ring, that a reference hands over.
func (c *conn) readChunk(hdr frame.Header, r *bodyRing, scratch *[]byte) (chunk, error) {
	if hdr.Kind == kindDataRef {
		return c.readRef(hdr, r, scratch)
	}
	if hdr.Len > chunkSize {
		return chunk{}, &protocolError{fmt.Sprintf("body chunk of %d bytes exceeds %d", hdr.Len, chunkSize)}
	}
	ch := chunk{buf: getBuffer(int(hdr.Len)), n: int(hdr.Len)}
	if err := c.fr.ReadPayload(ch.data()); err != nil {
		ch.release()
		return chunk{}, err
	}
	return ch, nil
}

// readRef reads the payload of a kindDataRef frame whose header is hdr,
// into scratch, and returns the chunk it hands over in r, whose slot it
// holds (see bodyRing.hold).
func (c *conn) readRef(hdr frame.Header, r *bodyRing, scratch *[]byte) (chunk, error) {
	if r == nil || hdr.Len != 8 {
		return chunk{}, &protocolError{"body chunk in shared memory, which there is none of, or a malformed reference to one"}
	}
	if cap(*scratch) < 8 {
		*scratch = make([]byte, 8)
	}
	ref := (*scratch)[:8] // a local array would escape to the heap
	if err := c.fr.ReadPayload(ref); err != nil {
		return chunk{}, err
	}
	slot, n := binary.BigEndian.Uint32(ref[:4]), binary.BigEndian.Uint32(ref[4:])
	if n == 0 || n > chunkSize {
		return chunk{}, &protocolError{fmt.Sprintf("body chunk of %d bytes in shared memory, outside 1 to %d", n, chunkSize)}
	}
	if !r.hold(slot) {
		return chunk{}, &protocolError{fmt.Sprintf("body chunk in shared memory slot %d, which is not a slot or was not freed", slot)}
	}
	return chunk{ring: r, slot: int32(slot), n: int(n)}, nil
}

// readMessage reads a payload of n bytes into scratch and decodes it into v.
func (c *conn) readMessage(n uint32, scratch *[]byte, v any) error {
	if cap(*scratch) < int(n) {
		*scratch = make([]byte, n)
	}
	p := (*scratch)[:n]
	if err := c.fr.ReadPayload(p); err != nil {
		return err
	}
	if err := c.dec.decode(p, v); err != nil {
		return &protocolError{fmt.Sprintf("bad %T message: %v", v, err)}
	}
	return nil
}

// A protocolError reports a child that broke the protocol. The parent kills
// such a child.
type protocolError struct {
	reason string
}

func (e *protocolError) Error() string { return "protocol error: " + e.reason }

// A child is the parent's view of one child process: one incarnation of a
// module.
type child struct {
	h           *Handle       // fixed
	incarnation int           // fixed
	proc        process       // fixed
	pipes       *childPipes   // fixed
	*conn                     // the pipes to the child
	ready       chan error    // receives the handshake's outcome once, from readLoop
	done        chan struct{} // closed when readLoop returns: the child answers nothing more
	exited      chan struct{} // closed when waitLoop has reaped the process
	exitErr     error         // the process's exit status; read only after exited is closed
	dying       chan struct{} // closed when the exit word says the child is dying (see startExitWatch)
	exitWatch   chan struct{} // closed when the exit word's watch has ended; nil if it never began
	exitStop    atomic.Bool   // ends the exit word's watch
	accept      *acceptWord   // fixed; the child's record of the requests it took
	ring        *bodyRing     // fixed; the up ring, where the child puts body chunks, nil for none (see bodyRing)
	flow        *flowBudget   // fixed; the Handle's budget for response windows, shared by all its children
	heads       *flowBudget   // fixed; the Handle's budget for large response heads and trailers (see headBudgetSize)
	logs        sync.WaitGroup
	source      *logcapture.Source // fixed; where its output goes, and its last lines
	slot        int                // fixed; the slot of the pool it fills
	readyAt     time.Time          // when it became ready; written by startChild with h.mu held
	retired     bool               // retire has run; only its slot's supervisor touches it
	maxRequests uint64             // fixed once ready; its MaxRequests, jittered; 0 for none
	recycle     chan string        // capacity 1; the reason it is due for recycling, sent once (see askRecycleLocked)
	monitored   chan struct{}      // made once ready; closed when its health monitor has returned
	stopping    chan struct{}      // closed once it is told to stop: it answers no more checks
	stopOnce    sync.Once
	hung        chan struct{} // capacity 1; Handle.HealthCheck's word to the monitor that c must be killed

	// Guarded by h.mu.
	state        string        // "starting", "running", "draining", "exited"
	inFlight     int           // requests acquired for it
	idle         chan struct{} // if not nil, closed when inFlight reaches zero
	requests     uint64        // requests it answered
	recycleAsked bool          // recycle has been sent
	memory       int64         // resident bytes at the last check
	stuck        bool          // ChildStuck was reported
	failedChecks int           // health checks failed in a row
	lastRTT      time.Duration // round trip of the last successful check

	mu      sync.Mutex // guards the fields below
	pending map[uint64]*stream
	// running holds the streams whose request's goroutine is serving
	// them, until it returns (see finished): those of pending, and those
	// whose response the child has ended and the parent is still writing.
	running map[*stream]struct{}
	// forgotten holds the ids of streams the parent gave up before the
	// child ended them (see forget): what arrives for them is dropped.
	forgotten map[uint64]givenUp
	// forgottenTunnels holds those of them that the child hijacked: a
	// tunnel ends with kindAbort alone (see PROTOCOL.md). Nil until needed.
	forgottenTunnels map[uint64]bool
	nextID           uint64                   // the last stream id issued
	pings            map[uint64]chan struct{} // ping sequence → closed on pong
	nextSeq          uint64                   // the last ping sequence issued
	err              error                    // why the child can take no more requests; nil while it can
	pid              int                      // from the child's ready message
}

// newChild returns the parent's view of a child process that speaks over
// conn. The caller starts its goroutines.
func newChild(h *Handle, incarnation int, proc process, conn *conn, accept *acceptWord) *child {
	return &child{
		h:           h,
		accept:      accept,
		flow:        &h.flow,
		heads:       &h.heads,
		incarnation: incarnation,
		proc:        proc,
		conn:        conn,
		ready:       make(chan error, 1),
		done:        make(chan struct{}),
		exited:      make(chan struct{}),
		dying:       make(chan struct{}),
		recycle:     make(chan string, 1),
		stopping:    make(chan struct{}),
		hung:        make(chan struct{}, 1),
		pending:     make(map[uint64]*stream),
		running:     make(map[*stream]struct{}),
		forgotten:   make(map[uint64]givenUp),
		pings:       make(map[uint64]chan struct{}),
	}
}

// open registers a new stream for r and sends its head. It fails without
// sending anything if the child can take no more requests, or with
// errCanceled if r's context ends while the pipe is backed up.
func (c *child) open(r *http.Request, head *requestHead) (*stream, error) {
	credit := initialWindow
	// The child decides from the header it is sent, so decide from that.
	if headerHasToken(head.Header["Expect"], "100-continue") {
		credit = 0 // the child grants the window when its handler first reads
	}
	var flags uint8
	if !hasBody(r) {
		flags = flagNoBody
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.nextID++
	s := newStream(c.nextID, credit)
	s.recv.budget, s.heads = c.flow, c.heads
	s.hijackOK = head.Hijackable
	c.pending[s.id] = s
	c.running[s] = struct{}{}
	c.mu.Unlock()
	if err := c.send(outFrame{kind: kindRequest, flags: flags, id: s.id, msg: head}, r.Context().Done()); err != nil {
		c.finished(s)
		c.mu.Lock()
		delete(c.pending, s.id)
		c.mu.Unlock()
		return nil, err
	}
	return s, nil
}

// finished records that the request's goroutine is done with s.
func (c *child) finished(s *stream) {
	c.mu.Lock()
	delete(c.running, s)
	c.mu.Unlock()
}

// cutRunning cuts the writes to their clients of every request the child
// serves (see stream.cutWrites): its drain has ended, and the requests
// are canceled, those too whose response the child has ended and that
// wait for a client that reads nothing.
func (c *child) cutRunning() {
	c.mu.Lock()
	running := make([]*stream, 0, len(c.running))
	for s := range c.running {
		running = append(running, s)
	}
	c.mu.Unlock()
	for _, s := range running {
		s.cutWrites()
	}
}

// hasBody reports whether r has a body to send to the child.
func hasBody(r *http.Request) bool {
	return r.Body != nil && r.Body != http.NoBody && (r.ContentLength != 0 || len(r.TransferEncoding) > 0)
}

// usable reports whether the child can take new requests: it has not
// failed, and the pipe to it has not (see pipeBroken).
func (c *child) usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return false
	}
	select {
	case <-c.broken:
		return false
	default:
		return true
	}
}

// ping sends one ping and waits for its pong.
func (c *child) ping(timeout <-chan struct{}) (time.Duration, error) {
	pong := make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	c.nextSeq++
	seq := c.nextSeq
	c.pings[seq] = pong
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pings, seq)
		c.mu.Unlock()
	}()
	start := time.Now()
	// A child that is hung with its pipe full holds the ping until
	// timeout, no longer: the parent's writes never wait for the child.
	if err := c.send(outFrame{kind: kindPing, id: seq}, timeout); err != nil {
		if err == errCanceled {
			err = errPingTimeout
		}
		return 0, err
	}
	select {
	case <-pong:
		return time.Since(start), nil
	case <-c.done:
		return 0, c.doneErr()
	case <-timeout:
		return 0, errPingTimeout
	}
}

var errPingTimeout = errors.New("no answer to a health check in time")

// doneErr returns why the child stopped answering; call it after done is
// closed.
func (c *child) doneErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// readLoop reads the child's handshake and then its frames until the pipe
// fails, then fails every request still pending.
func (c *child) readLoop() {
	err := c.handshake()
	c.ready <- err
	if err != nil {
		c.fail(err, nil) // nothing but hello was sent before ready
		close(c.done)
		return
	}
	err = c.readFrames()
	var pe *protocolError
	if errors.As(err, &pe) {
		c.h.logf("child pid %d: %v; killing it (the module will restart)", c.proc.Pid(), err)
		c.proc.Kill()
	}
	// Whatever ended the pipe, the child answers nothing more. Which
	// requests it took is known for sure only once it can take no more:
	// if any are pending, ended waits for that.
	c.fail(err, c.ended)
	close(c.done)
}

// ended waits for the child to exit, as it does when its pipe ends because
// it is exiting, and kills it if it lives on. It reports whether the child
// has exited.
func (c *child) ended() bool {
	if c.awaitExit() {
		return true
	}
	c.proc.Kill()
	return c.awaitExit()
}

// exitWait bounds how long readLoop waits for a killed child to exit before
// it fails the requests in flight.
const exitWait = time.Second

// awaitExit waits until the child has exited and reports whether it has.
func (c *child) awaitExit() bool {
	select {
	case <-c.exited:
		return true
	default:
	}
	t := time.NewTimer(exitWait)
	defer t.Stop()
	select {
	case <-c.exited:
		return true
	case <-t.C:
		return false
	}
}

// handshake reads the preamble and the ready message.
func (c *child) handshake() error {
	if err := frame.ReadPreamble(c.fr.Buffered(), protocolVersion); err != nil {
		return err
	}
	hdr, err := c.fr.ReadHeader()
	if err != nil {
		return err
	}
	if hdr.Kind != kindReady || hdr.ID != 0 {
		return &protocolError{fmt.Sprintf("first message is of kind %d, want ready", hdr.Kind)}
	}
	var scratch []byte
	var rd ready
	if err := c.readMessage(hdr.Len, &scratch, &rd); err != nil {
		return err
	}
	if rd.Err != "" {
		return &initError{msg: rd.Err}
	}
	c.mu.Lock()
	c.pid = rd.Pid
	c.mu.Unlock()
	return nil
}

// An initError carries a ModuleFunc's error across the pipe.
type initError struct{ msg string }

func (e *initError) Error() string { return e.msg }

// readFrames dispatches the child's frames until the pipe ends or the child
// breaks the protocol.
func (c *child) readFrames() error {
	var scratch []byte
	for {
		hdr, err := c.fr.ReadHeader()
		if err != nil {
			var fe *frame.FormatError
			if errors.As(err, &fe) {
				return &protocolError{fe.Error()}
			}
			return err
		}
		if err := c.dispatch(hdr, &scratch); err != nil {
			return err
		}
	}
}

// dispatch handles one frame whose header has been read.
func (c *child) dispatch(hdr frame.Header, scratch *[]byte) error {
	switch hdr.Kind {
	case kindPong:
		if hdr.Len != 0 {
			return &protocolError{"pong with a payload"}
		}
		c.mu.Lock()
		pong, ok := c.pings[hdr.ID]
		if ok {
			delete(c.pings, hdr.ID)
		}
		late := hdr.ID <= c.nextSeq
		c.mu.Unlock()
		if ok {
			close(pong)
		} else if !late {
			return &protocolError{fmt.Sprintf("pong for ping %d, which was never sent", hdr.ID)}
		}
		return nil

	case kindWindow:
		if hdr.Len != 4 {
			return &protocolError{"window update of the wrong size"}
		}
		var b [4]byte
		if err := c.fr.ReadPayload(b[:]); err != nil {
			return err
		}
		s, err := c.lookup(hdr.ID, true)
		if s == nil || err != nil {
			return err
		}
		if err := s.win.add(int(binary.BigEndian.Uint32(b[:]))); err != nil {
			return &protocolError{err.Error()}
		}
		return nil

	case kindResponse, kindData, kindDataRef, kindEnd, kindAbort, kindHijack:
		s, err := c.lookup(hdr.ID, false)
		if err != nil {
			return err
		}
		ev := event{kind: hdr.Kind, flags: hdr.Flags &^ flagOverBudget}
		switch hdr.Kind {
		case kindResponse:
			ev.head = new(responseHead)
			if err := c.readMessage(hdr.Len, scratch, ev.head); err != nil {
				return err
			}
			ev.cost = ev.head.cost
		case kindData, kindDataRef:
			if ev.chunk, err = c.readChunk(hdr, c.ring, scratch); err != nil {
				return err
			}
			ev.kind = kindData
		case kindEnd:
			if hdr.Len > 0 {
				var end bodyEnd
				if err := c.readMessage(hdr.Len, scratch, &end); err != nil {
					return err
				}
				ev.trailer, ev.cost = end.Trailer, end.cost
			}
		case kindAbort, kindHijack:
			if hdr.Len != 0 {
				return &protocolError{"abort or hijack with a payload"}
			}
		}
		if s == nil {
			// Given up (see forget): read, as the decoder must see every
			// message, and dropped.
			ev.release()
			c.mu.Lock()
			switch {
			case hdr.Kind == kindHijack:
				c.forgetTunnelLocked(hdr.ID)
			case hdr.Kind == kindAbort || hdr.Kind == kindEnd && !c.forgottenTunnels[hdr.ID]:
				c.dropForgottenLocked(hdr.ID)
			}
			c.mu.Unlock()
			return nil
		}
		if err := s.push(ev); err != nil {
			return &protocolError{fmt.Sprintf("request %d: %v", hdr.ID, err)}
		}
		if hdr.Kind == kindHijack {
			// Forgotten since the lookup, before s was a tunnel: forget
			// saw none.
			c.mu.Lock()
			if _, ok := c.forgotten[hdr.ID]; ok {
				c.forgetTunnelLocked(hdr.ID)
			}
			c.mu.Unlock()
		}
		if hdr.Kind == kindAbort || hdr.Kind == kindEnd && !s.tunneled() {
			// The stream may have been forgotten since the lookup (its
			// request given up at the deadline it shares with the
			// handler): its handler has ended all the same, and an entry
			// left in forgotten would count as stuck for good.
			c.mu.Lock()
			delete(c.pending, hdr.ID)
			c.dropForgottenLocked(hdr.ID)
			c.mu.Unlock()
		}
		return nil
	}
	return &protocolError{fmt.Sprintf("unknown message kind %d", hdr.Kind)}
}

// lookup returns the pending stream with the given id, or nil for one the
// parent gave up (see forget). A message for an id that was never issued is
// a protocol error; so is one for a finished stream, unless finishedOK, in
// which case lookup returns nil.
func (c *child) lookup(id uint64, finishedOK bool) (*stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.pending[id]; ok {
		return s, nil
	}
	if _, ok := c.forgotten[id]; ok {
		return nil, nil
	}
	if id == 0 || id > c.nextID {
		return nil, &protocolError{fmt.Sprintf("message for request %d, which was never sent", id)}
	}
	if finishedOK {
		return nil, nil
	}
	return nil, &protocolError{fmt.Sprintf("message for request %d, which has finished", id)}
}

// fail records why the child can take no more requests and fails every
// pending request with it. If there are any, and dead (if not nil) reports
// that the child is dead, requests it did not take (see acceptWord) fail
// with a *notDeliveredError.
func (c *child) fail(err error, dead func() bool) {
	if err == nil || err == io.EOF || err == io.ErrUnexpectedEOF {
		err = errChildExited
	}
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err // a reason given first, by condemn, explains the end best
	pending := c.pending
	c.pending = map[uint64]*stream{}
	for id := range c.forgotten {
		c.dropForgottenLocked(id) // their handlers end with the child
	}
	c.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	taken := uint64(1<<64 - 1) // all of them, unless the child's record can be trusted
	if dead != nil && dead() {
		taken = c.accept.load()
	}
	for _, s := range pending {
		if s.id > taken {
			s.fail(&notDeliveredError{err})
		} else {
			s.fail(err)
		}
	}
}

// forget releases stream s, which the request's goroutine has given up
// before the child ended it: a handler that never returns then holds a map
// entry in the parent, not the stream. What arrives for s is dropped.
//
// With place, the request's MaxInFlight place goes with the entry: the
// handler holds it while it runs on in the child, and it is given back
// once the handler has ended (the child ended the stream, or died). forget
// reports false, having taken nothing, if s was not pending: the child had
// ended it already. at is when the request's context ended: stuck
// detection counts from it (see givenUpSince).
func (c *child) forget(s *stream, place bool, at time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending[s.id] != s {
		return false
	}
	delete(c.pending, s.id)
	c.forgotten[s.id] = givenUp{at, place}
	if s.tunneled() {
		// The hijack was read: the tunnel ends with kindAbort alone.
		c.forgetTunnelLocked(s.id)
	}
	return true
}

// A givenUp is a stream in child.forgotten: when it was given up, and
// whether it holds its request's MaxInFlight place (see forget).
type givenUp struct {
	at    time.Time
	place bool
}

// dropForgottenLocked removes the forgotten stream id, whose handler has
// ended, and gives back the place it held. c.mu must be held.
func (c *child) dropForgottenLocked(id uint64) {
	g := c.forgotten[id]
	delete(c.forgotten, id)
	delete(c.forgottenTunnels, id)
	if g.place {
		c.h.unadmit()
	}
}

// forgetTunnelLocked records that the forgotten stream id is a tunnel.
func (c *child) forgetTunnelLocked(id uint64) {
	if c.forgottenTunnels == nil {
		c.forgottenTunnels = make(map[uint64]bool)
	}
	c.forgottenTunnels[id] = true
}

// givenUpSince returns when the oldest request that the parent gave up
// and whose handler has not ended was given up, and how many there are.
func (c *child) givenUpSince() (oldest time.Time, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, g := range c.forgotten {
		if oldest.IsZero() || g.at.Before(oldest) {
			oldest = g.at
		}
	}
	return oldest, len(c.forgotten)
}

// askRecycleLocked asks c's supervisor to replace it gracefully, for
// reason, unless that was asked already. h.mu must be held.
func (c *child) askRecycleLocked(reason string) {
	if !c.recycleAsked {
		c.recycleAsked = true
		c.recycle <- reason // capacity 1, sent once
	}
}

// condemn makes c take no more requests, and makes err the reason its
// pending requests fail with when it dies: call it before killing c.
func (c *child) condemn(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

// tail returns c's last lines of output.
func (c *child) tail() []string { return c.source.Tail() }

// endChecks stops c's health checks: c has been told to stop.
func (c *child) endChecks() { c.stopOnce.Do(func() { close(c.stopping) }) }

// A notDeliveredError fails a request that its child never read: the module
// did not see it, so another child may take it.
type notDeliveredError struct{ err error }

func (e *notDeliveredError) Error() string { return e.err.Error() + " before it read the request" }
func (e *notDeliveredError) Unwrap() error { return e.err }

// errChildExited reports a child whose pipe ended: it exited or closed it.
var errChildExited = errors.New("the child exited")

// startExitWatch starts a goroutine that closes dying when the child's exit
// word reports its death (see waitExitWord), if the child armed the word.
// It is called once, when the child is ready; the goroutine holds a thread
// while it waits.
func (c *child) startExitWatch() {
	w := c.accept.exitWord()
	if w == nil || w.Load() == 0 {
		return
	}
	c.exitWatch = make(chan struct{})
	go func() {
		defer close(c.exitWatch)
		if waitExitWord(w, &c.exitStop) {
			close(c.dying)
		}
	}()
}

// stopExitWatch ends the exit word's watch, and waits for its end, once the
// child is dead: before the shared page is unmapped.
func (c *child) stopExitWatch() {
	if c.exitWatch != nil {
		stopExitWord(c.accept.exitWord(), &c.exitStop)
		<-c.exitWatch
	}
}

// waitLoop reaps the process and records its exit status.
func (c *child) waitLoop() {
	c.exitErr = c.proc.Wait()
	close(c.exited)
}
