package subproc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
)

// This file is the child's side of the protocol: its readLoop, which turns
// the parent's messages into requests for the module's handler, and the
// http.ResponseWriter that turns the handler's answer into messages.

// errStop is readLoop's result when the parent sent kindStop.
var errStop = errors.New("stop")

// A server serves the parent's requests in the child.
type server struct {
	*conn
	ctx    context.Context // fixed; canceled when the child stops
	drain  func()          // fixed; cancels the ModuleFunc's context
	stacks io.Writer       // where dumpStacks writes; nil for nowhere
	active sync.WaitGroup  // handlers running

	accept   *acceptWord // fixed; see open
	recvRing *bodyRing   // fixed; the down ring, where the parent puts body chunks, nil for none (see bodyRing)

	work     chan task    // to an idle worker; unbuffered
	idle     atomic.Int32 // workers waiting on work
	readDone chan error   // why the reading ended; capacity 1

	scratch []byte      // for decoding messages; owned by the goroutine that reads (see read)
	head    requestHead // the head being opened; owned by the goroutine that reads

	// The base context of the last request with a local address: ctx with
	// http.LocalAddrContextKey set to it, as net/http sets it. Owned by
	// the goroutine that reads, like scratch: almost every request comes
	// through the same listener of the parent's, and then reuses it.
	local    string
	localCtx context.Context

	flow flowBudget // the window growth of all request bodies (see flowBudget)

	// The reading turn lent to the worker serving a request (see lend).
	lendMu    sync.Mutex
	lent      *serverStream // the request whose worker holds the turn, or nil
	lendTimer *time.Timer   // ends the loan after lendFor; made by the first loan
	lendFor   time.Duration // the longest loan: defaultLendFor but in tests
	endLoan   func()        // s.reclaim(nil), made once

	mu      sync.Mutex // guards the fields below
	handler http.Handler
	streams map[uint64]*serverStream
}

// A startingRequest is a request whose handler has not started.
type startingRequest struct {
	id  uint64
	st  *serverStream
	req *http.Request
	h   http.Handler
}

// A serverStream is one request being served in the child.
type serverStream struct {
	cancel   context.CancelCauseFunc      // cancels the request's context
	deadline time.Time                    // the request's deadline, zero for none; fixed
	body     *bodyReader                  // nil for a request without a body
	tunnel   atomic.Pointer[hijackedConn] // set when the handler hijacks (see PROTOCOL.md)

	// Allocated with the stream, as most requests need nothing else.
	rw  responseWriter
	url url.URL // the request's
}

// newServer returns a server for the requests that arrive on c. Canceling
// ctx cancels every request's context and ends the idle workers; drain is
// called when the parent begins to drain the child (nil: nothing to do).
func newServer(ctx context.Context, drain func(), c *conn, accept *acceptWord, h http.Handler) *server {
	if drain == nil {
		drain = func() {}
	}
	s := &server{
		conn:     c,
		ctx:      ctx,
		drain:    drain,
		accept:   accept,
		handler:  h,
		streams:  make(map[uint64]*serverStream),
		work:     make(chan task),
		readDone: make(chan error, 1),
		lendFor:  defaultLendFor,
	}
	s.endLoan = func() { s.reclaim(nil) }
	return s
}

func (s *server) setHandler(h http.Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handler = h
}

func (s *server) stream(id uint64) *serverStream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.streams[id]
}

// readLoop reads the parent's messages until the pipe ends (io.EOF), the
// parent says stop (errStop), or a message is malformed, and returns why.
// Messages for a request that has finished are dropped: they cross the
// handler's end on the pipe.
//
// The reading itself moves from goroutine to goroutine (see read); readLoop
// starts it and waits for its end.
func (s *server) readLoop() error {
	s.spawn(task{read: true})
	return <-s.readDone
}

// A task is a worker's next job: to serve a request, or to read.
type task struct {
	r    startingRequest
	read bool
}

// maxIdleWorkers bounds the goroutines kept waiting for tasks.
const maxIdleWorkers = 256

// spawn gives t to an idle worker, or to a new one if none is idle.
//
// Workers outlive their tasks because a goroutine's first request costs
// more than its handler: starting the goroutine, and growing its stack as
// the handler (net/http's ServeMux already) goes deeper than a new
// goroutine's stack allows. A worker that has served keeps its stack.
func (s *server) spawn(t task) {
	select {
	case s.work <- t:
	default:
		go s.worker(t)
	}
}

// worker does t, then whatever spawn hands it, until the server's context
// ends or enough other workers are idle.
func (s *server) worker(t task) {
	for {
		if t.read {
			var ok bool
			if t.r, ok = s.read(); !ok {
				t.r = startingRequest{}
			}
		}
		if r := t.r; r.st != nil {
			s.serve(r.id, r.st, r.req, r.h)
			if s.reclaim(r.st) {
				// The turn was lent to this request, and is back: read on.
				t = task{read: true}
				continue
			}
		}
		t = task{}
		if s.idle.Add(1) > maxIdleWorkers {
			s.idle.Add(-1)
			return
		}
		select {
		case t = <-s.work:
			s.idle.Add(-1)
		case <-s.ctx.Done():
			s.idle.Add(-1)
			return
		}
	}
}

// read reads and dispatches the parent's frames until one opens a request.
// Then it hands the reading on to another worker, or lends it to the
// request (see lend), and returns the request, for the calling worker to
// serve: the handler starts without waiting for another goroutine to be
// scheduled, which is most of a request's latency in the child. When the
// reading ends, read reports why on readDone and returns false.
func (s *server) read() (startingRequest, bool) {
	for {
		hdr, err := s.fr.ReadHeader()
		var r startingRequest
		switch {
		case err != nil:
		case hdr.Kind == kindRequest:
			r, err = s.openFrame(hdr)
		default:
			err = s.dispatch(hdr, &s.scratch)
		}
		if err != nil {
			s.readDone <- err
			return startingRequest{}, false
		}
		if r.st != nil {
			if !s.lend(r.st, hdr.Flags) {
				s.spawn(task{read: true})
			}
			return r, true
		}
	}
}

// defaultLendFor bounds a loan of the reading turn (see lend): a handler
// that runs longer hands the reading on, as one that would wait for the
// parent does at once.
const defaultLendFor = 50 * time.Microsecond

// lend lends the reading turn to the worker that is to serve st, a request
// just read, and reports whether it did: when nothing else has arrived
// from the parent and the request has no body. Its worker then reads on
// once the handler returns, with no hand-off to another goroutine, whose
// wake-up would cost the child about a third of its time per request. The
// loan ends, and the reading goes to another worker, when the handler
// would wait for a frame (for window credit, or after a hijack), or after
// s.lendFor. Until then the parent's frames wait in the pipe.
func (s *server) lend(st *serverStream, flags uint8) bool {
	if flags&flagNoBody == 0 || s.fr.Buffered().Buffered() > 0 {
		return false
	}
	s.lendMu.Lock()
	defer s.lendMu.Unlock()
	s.lent = st
	if s.lendTimer == nil {
		s.lendTimer = time.AfterFunc(s.lendFor, s.endLoan)
	} else {
		s.lendTimer.Reset(s.lendFor)
	}
	return true
}

// reclaim ends the loan of the reading turn to st (any loan, for nil) and
// reports whether there was one. Called with st by the worker that served
// st, it returns the turn to that worker, which must read on; called by
// anything else (the loan's timer, a handler about to wait for the
// parent), it gives the turn to another worker.
func (s *server) reclaim(st *serverStream) bool {
	s.lendMu.Lock()
	if s.lent == nil || st != nil && s.lent != st {
		s.lendMu.Unlock()
		return false
	}
	s.lent = nil
	s.lendTimer.Stop()
	s.lendMu.Unlock()
	if st == nil {
		s.spawn(task{read: true})
	}
	return true
}

// push gives a chunk of the body of request id, or of the tunnel it became,
// to its reader; it drops the chunk if there is none.
func (s *server) push(id uint64, c chunk) error {
	st := s.stream(id)
	if st == nil {
		c.release()
		return nil
	}
	in := st.body
	if t := st.tunnel.Load(); t != nil {
		in = t.in
	}
	if in == nil {
		c.release()
		return nil
	}
	if err := in.push(c); err != nil {
		return &protocolError{err.Error()}
	}
	return nil
}

// openFrame reads a kindRequest frame's head and opens its request.
func (s *server) openFrame(hdr frame.Header) (startingRequest, error) {
	s.head = requestHead{}
	if err := s.readMessage(hdr.Len, &s.scratch, &s.head); err != nil {
		return startingRequest{}, err
	}
	return s.open(hdr.ID, hdr.Flags, &s.head)
}

// dispatch handles one frame of another kind than kindRequest (see read).
func (s *server) dispatch(hdr frame.Header, scratch *[]byte) error {
	switch hdr.Kind {
	case kindData, kindDataRef:
		c, err := s.readChunk(hdr, s.recvRing, scratch)
		if err != nil {
			return err
		}
		return s.push(hdr.ID, c)

	case kindEnd:
		if hdr.Flags&flagBodyError != 0 {
			return s.bodyError(hdr)
		}
		var end bodyEnd
		if hdr.Len > 0 {
			if err := s.readMessage(hdr.Len, scratch, &end); err != nil {
				return err
			}
		}
		if st := s.stream(hdr.ID); st != nil {
			if t := st.tunnel.Load(); t != nil {
				t.in.end(io.EOF, nil) // the client closed its side
			} else if st.body != nil {
				st.body.end(io.EOF, end.Trailer)
			}
		}
		return nil

	case kindWindow:
		if hdr.Len != 4 {
			return &protocolError{"window update of the wrong size"}
		}
		var b [4]byte
		if err := s.fr.ReadPayload(b[:]); err != nil {
			return err
		}
		if st := s.stream(hdr.ID); st != nil {
			if err := st.rw.win.add(int(binary.BigEndian.Uint32(b[:]))); err != nil {
				return &protocolError{err.Error()}
			}
		}
		return nil

	case kindCancel:
		if st := s.stream(hdr.ID); st != nil {
			if hdr.Flags&flagMayRead != 0 {
				// The context ends, the response goes on, until a
				// kindCancel without the flag.
				st.rw.stayOn(s.ctx)
				st.cancel(nil)
				return s.fr.Discard(int(hdr.Len))
			}
			st.rw.leave()
			switch {
			case hdr.Flags&flagDeadline == 0:
				st.cancel(nil) // the client went away
			case st.deadline.IsZero():
				st.cancel(errDeadline)
			default:
				// The context's own timer ends it at the same moment,
				// and then its Err is context.DeadlineExceeded, as
				// in-process; the parent's word often comes first (the
				// child's timer may fire a millisecond late), and a
				// cancel would make it context.Canceled. So the cancel
				// is only the fallback, for a clock that lags.
				time.AfterFunc(time.Until(st.deadline)+deadlineGrace, func() { st.cancel(errDeadline) })
			}
			if st.body != nil {
				st.body.end(errClientGone, nil)
			}
			if t := st.tunnel.Load(); t != nil {
				t.reset()
			}
		}
		return s.fr.Discard(int(hdr.Len))

	case kindPing:
		s.send(outFrame{kind: kindPong, id: hdr.ID}, nil)
		return s.fr.Discard(int(hdr.Len))

	case kindStop:
		return errStop

	case kindDrain:
		s.drain()
		return s.fr.Discard(int(hdr.Len))

	case kindStacks:
		go s.dumpStacks() // the profile takes a while: not on the reader
		return s.fr.Discard(int(hdr.Len))
	}
	return &protocolError{fmt.Sprintf("unknown message kind %d", hdr.Kind)}
}

// bodyError handles a kindEnd frame with flagBodyError: the request body
// ends with the error the payload describes.
func (s *server) bodyError(hdr frame.Header) error {
	if hdr.Len > maxBodyErrorLen {
		return &protocolError{fmt.Sprintf("body error of %d bytes exceeds %d", hdr.Len, maxBodyErrorLen)}
	}
	var b [maxBodyErrorLen]byte
	p := b[:hdr.Len]
	if err := s.fr.ReadPayload(p); err != nil {
		return err
	}
	err, ok := parseBodyError(p)
	if !ok {
		return &protocolError{fmt.Sprintf("malformed body error %x", p)}
	}
	if st := s.stream(hdr.ID); st != nil && st.body != nil {
		st.body.end(err, nil)
	}
	return nil
}

// dumpStacks writes every goroutine's stack to the module's log, as
// runtime/pprof's goroutine profile prints them at debug level 2, in one
// write, so that its lines stay together.
func (s *server) dumpStacks() {
	if s.stacks == nil {
		return
	}
	var b bytes.Buffer
	b.WriteString("subproc: the parent found this child stuck (handlers ran on for Options.StuckTimeout after their requests ended); the stacks of its goroutines follow\n")
	pprof.Lookup("goroutine").WriteTo(&b, 2)
	s.stacks.Write(b.Bytes())
}

// errDeadline is the cause of a request context that ended at the
// deadline the parent gave it: the parent's request context's, or
// Options.RequestTimeout's.
var errDeadline = errors.New("subproc: the request's deadline passed (its context's in the parent, or Options.RequestTimeout)")

// deadlineGrace is how long after a request's deadline the child cancels
// its context, when the parent said the deadline passed and the context's
// own timer has not ended it yet.
const deadlineGrace = 20 * time.Millisecond

// errClientGone is what a handler's body read returns once the client has
// gone away: its connection was reset, or the parent's request ended,
// while the body was still coming. It matches io.ErrUnexpectedEOF, as
// net/http's own body errors do for a client that closed its connection
// before the end of the body.
var errClientGone = fmt.Errorf("subproc: client disconnected before the end of the request body: %w", io.ErrUnexpectedEOF)

// open registers a request and returns it, for its handler to be started.
//
// Before the handler starts, the accept word is raised to the request's id:
// if the child dies, the parent gives the requests it finds no record of to
// the next child, as the module never saw them.
func (s *server) open(id uint64, flags uint8, head *requestHead) (startingRequest, error) {
	st := new(serverStream)
	// Built here, and copied once by WithContext below.
	r, err := head.request(&st.url)
	if err != nil {
		return startingRequest{}, &protocolError{err.Error()}
	}
	// As the parent's ServeMux or Route set them; the module's own
	// ServeMux, if it matches, sets its own, as in-process. (One
	// difference: there, a wildcard of the parent's pattern that is not
	// one of the module's reads "" after the module's ServeMux matched;
	// here, the parent's value, as SetPathValue keeps it apart.)
	r.Pattern = head.Pattern
	for i := 0; i+1 < len(head.PathValues); i += 2 {
		r.SetPathValue(head.PathValues[i], head.PathValues[i+1])
	}
	s.mu.Lock()
	if s.handler == nil {
		s.mu.Unlock()
		return startingRequest{}, &protocolError{"request before ready"}
	}
	if _, dup := s.streams[id]; dup {
		s.mu.Unlock()
		return startingRequest{}, &protocolError{fmt.Sprintf("request id %d reused", id)}
	}
	// Canceled with a nil cause (context.Canceled), as net/http cancels a
	// request whose client went away, or with errDeadline.
	ctx, cancel := context.WithCancelCause(s.baseContext(head.LocalAddr))
	st.cancel = cancel
	if head.Deadline != 0 {
		// The parent's request ends at the same moment, with a 504.
		var stop context.CancelFunc
		st.deadline = time.Unix(0, head.Deadline)
		ctx, stop = context.WithDeadlineCause(ctx, st.deadline, errDeadline)
		st.cancel = func(cause error) {
			cancel(cause)
			stop()
		}
	}
	if flags&flagNoBody != 0 {
		r.Body = http.NoBody
	} else {
		expect := headerHasToken(r.Header["Expect"], "100-continue")
		st.body = newBodyReader(func(n int) { s.sendWindowUpdate(id, n, st.rw.stopC()) }, expect, &s.flow)
		r.Body = st.body
	}
	req := r.WithContext(ctx)
	st.rw.init(s.conn, id, req, head.ResponseHeader)
	st.rw.endLoan = s.endLoan
	st.rw.body = st.body
	if st.body != nil {
		st.body.trailer = &req.Trailer
		st.body.deadline = st.rw.rdl.wait
	}
	if head.Hijackable {
		st.rw.hijack = func() (*hijackedConn, error) { return s.hijack(id, st, req) }
	}
	s.streams[id] = st
	s.active.Add(1)
	h := s.handler
	s.mu.Unlock()
	s.accept.raise(id)
	return startingRequest{id: id, st: st, req: req, h: h}, nil
}

// baseContext returns the context a request whose connection has the local
// address local in the parent starts from: the server's, with
// http.LocalAddrContextKey set when local is known. It is called by the
// goroutine that reads.
func (s *server) baseContext(local string) context.Context {
	if local == "" {
		return s.ctx
	}
	if local != s.local {
		s.local = local
		s.localCtx = context.WithValue(s.ctx, http.LocalAddrContextKey, parseLocalAddr(local))
	}
	return s.localCtx
}

// hijack turns stream id into a tunnel (see PROTOCOL.md, "Upgrades") and
// returns its conn. It fails if the request body is not complete, or the
// request is gone. The caller holds st.rw.mu.
func (s *server) hijack(id uint64, st *serverStream, req *http.Request) (*hijackedConn, error) {
	s.reclaim(nil) // the tunnel's bytes come in frames
	if b := st.body; b != nil {
		b.mu.Lock()
		complete := b.err == io.EOF && len(b.chunks) == 0
		b.mu.Unlock()
		if !complete {
			return nil, errors.New("subproc: Hijack before the request body was read to its end: read it all first")
		}
	}
	if err := st.rw.stopped(); err != nil {
		return nil, fmt.Errorf("subproc: Hijack: the request is gone: %w", err)
	}
	hc := newHijackedConn(s, id, &st.rw.win, req, func() {
		s.mu.Lock()
		if s.streams[id] == st {
			delete(s.streams, id)
		}
		s.mu.Unlock()
	})
	st.tunnel.Store(hc)
	if err := s.send(outFrame{kind: kindHijack, id: id}, nil); err != nil {
		hc.reset()
		return nil, err
	}
	if st.rw.stopped() != nil {
		// The parent's kindCancel came in between: it found no tunnel to
		// reset.
		hc.reset()
	}
	return hc, nil
}

// serve runs the handler for one request and ends its stream.
//
// Once the handler has returned, or panicked, and the response has ended,
// serve does what net/http's finishRequest does: it closes the body and
// removes the temporary files of a multipart form that the handler parsed
// (r.ParseMultipartForm, r.FormFile) into req, the request it was given.
// Unlike net/http, it does so after a panic too.
func (s *server) serve(id uint64, st *serverStream, req *http.Request, h http.Handler) {
	defer s.active.Done()
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				fmt.Fprintf(os.Stderr, "http: panic serving %s %s: %v\n%s", req.Method, req.URL.Path, v, debug.Stack())
			}
			st.rw.abort(v == http.ErrAbortHandler)
		}
		if st.tunnel.Load() == nil {
			// A hijacked conn outlives the handler, as in net/http: its
			// Close forgets the stream.
			s.mu.Lock()
			delete(s.streams, id)
			s.mu.Unlock()
		}
		st.cancel(nil)
		if p := st.rw.stay.Load(); p != nil {
			p.stop()
		}
		if st.body != nil {
			st.body.Close()
		}
		if req.MultipartForm != nil {
			req.MultipartForm.RemoveAll()
		}
	}()
	h.ServeHTTP(&st.rw, req)
	st.rw.finish()
}

// errAfterHandler is returned by writes after the handler returned.
var errAfterHandler = errors.New("subproc: write after the handler returned")

// A responseWriter is the http.ResponseWriter a module's handler writes to.
// It buffers up to a chunk of body, which it sends when more body follows,
// at a flush, or when the handler returns; it sends the response head with
// the first chunk or at the first flush, and holds no more than the window
// the parent grants in flight. Like net/http's, it is not safe for concurrent use by handlers;
// its mutex only orders it against its own teardown.
type responseWriter struct {
	c      *conn         // fixed
	id     uint64        // fixed
	req    *http.Request // fixed
	win    sendWindow    // credit granted by the parent
	header http.Header   // the handler's header map; fixed
	body   *bodyReader   // the request's body, nil for none; fixed

	mu            sync.Mutex  // guards the fields below
	wroteHeader   bool        // the final status is chosen
	status        int         // the final status
	sent          http.Header // the header as it was at WriteHeader
	trailers      []string    // declared trailer keys
	clen          int64       // the declared Content-Length, -1 for none
	written       int64       // body bytes written by the handler
	headSent      bool        // the final head has gone to the parent
	unflushed     bool        // something went to the parent since the last flush
	out           chunk       // the pending body bytes: in a pooled buffer, or in a slot of the up ring, filled in place
	fullDuplex    bool        // the handler called EnableFullDuplex
	informational int         // 1xx heads sent
	done          bool        // the handler has returned, or panicked
	aborted       bool        // kindAbort has ended the stream: nothing more is sent
	err           error       // a failure to send; writes return it

	hijack   func() (*hijackedConn, error) // turns the stream into a tunnel; nil if the parent cannot hijack; fixed
	endLoan  func()                        // ends a loan of the reading turn (see server.lend); fixed
	rdl, wdl connDeadline                  // http.ResponseController's read and write deadlines, before a hijack
	// stay is set when the request's context ended but its client may
	// still read (kindCancel with flagMayRead: an HTTP/1 client that
	// half-closed its connection, or a middleware in the parent that
	// canceled the context): in-process, net/http delivers what a handler
	// writes then, and so do the writes here (see stopped), until the
	// parent cancels for good (leave). Set by the reading goroutine before
	// it cancels the context.
	stay atomic.Pointer[stay]
	// conn is the hijacked conn, once Hijack succeeded: then it is the
	// handler's, the writer is done (see hijacked), and the
	// ResponseController's deadlines are the conn's, as in net/http, where
	// they are the connection's. Atomic, not under mu: a deadline may be
	// set to wake a write that waits, holding mu.
	conn atomic.Pointer[hijackedConn]
}

// A stay keeps a response going after its request's context ended (see
// responseWriter.stay).
type stay struct {
	done chan struct{} // closed by leave
	once sync.Once
	stop func() bool // stops the leave at the server's end; called as the handler ends
}

func (st *stay) leave() { st.once.Do(func() { close(st.done) }) }

// stayOn keeps the response going after the request's context ends, which
// the caller does next, until leave or the end of base, the server's
// context (this child ends).
func (w *responseWriter) stayOn(base context.Context) {
	st := &stay{done: make(chan struct{})}
	st.stop = context.AfterFunc(base, st.leave)
	if !w.stay.CompareAndSwap(nil, st) {
		st.stop()
	}
}

// leave ends a stay: the handler's writes fail, as the request's context
// has ended.
func (w *responseWriter) leave() {
	if st := w.stay.Load(); st != nil {
		st.leave()
	}
}

// stopped returns why the handler's writes fail: the request's context
// ended (the client went away, the parent gave the request up, or this
// child is ending), unless a stay keeps the response going; nil if they
// do not.
func (w *responseWriter) stopped() error {
	err := w.req.Context().Err()
	if err == nil {
		return nil
	}
	if st := w.stay.Load(); st != nil {
		select {
		case <-st.done:
		default:
			return nil
		}
	}
	return err
}

// stopC returns a channel closed once the handler's writes fail (see
// stopped); its end may have come before the stay did.
func (w *responseWriter) stopC() <-chan struct{} {
	if st := w.stay.Load(); st != nil {
		return st.done
	}
	return w.req.Context().Done()
}

// hijacked reports whether Hijack succeeded.
func (w *responseWriter) hijacked() bool { return w.conn.Load() != nil }

// init prepares the zero w as the writer for the response to request id.
// Its header map starts as header, the parent's (see
// requestHead.ResponseHeader), which it takes; nil means empty.
func (w *responseWriter) init(c *conn, id uint64, req *http.Request, header http.Header) {
	if header == nil {
		header = make(http.Header)
	}
	w.c, w.id, w.req, w.header, w.clen = c, id, req, header, -1
	w.win.init(initialWindow)
}

// Header returns the header map that WriteHeader sends, as net/http's does.
func (w *responseWriter) Header() http.Header { return w.header }

// WriteHeader sends a response header with the status code. 1xx codes other
// than 101 are sent at once and may be followed by others; the first other
// code is final.
func (w *responseWriter) WriteHeader(code int) {
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.hijacked() {
		fmt.Fprintf(os.Stderr, "http: response.WriteHeader on hijacked connection from %s %s\n", w.req.Method, w.req.URL.Path)
		return
	}
	if w.done {
		return
	}
	if w.wroteHeader {
		fmt.Fprintf(os.Stderr, "http: superfluous response.WriteHeader call with %d for %s %s\n", code, w.req.Method, w.req.URL.Path)
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		if w.informational++; w.informational > maxInformational {
			return // the parent would take more for a broken child
		}
		head := &responseHead{Status: code, Header: w.header.Clone(), FullDuplex: w.fullDuplex}
		if n := head.wireSize(); n > maxHeadSize {
			fmt.Fprintf(os.Stderr, "subproc: %d response for %s %s dropped: its head (about %d bytes) exceeds the %d bytes a message to the parent can carry\n", code, w.req.Method, w.req.URL.Path, n, maxHeadSize)
			return
		}
		w.sendLocked(outFrame{kind: kindResponse, id: w.id, msg: head})
		return
	}
	w.writeHeaderLocked(code)
}

func (w *responseWriter) writeHeaderLocked(code int) {
	w.wroteHeader = true
	w.status = code
	w.sent = w.header.Clone()
	w.trailers = declaredTrailers(w.sent)
	if cl := w.sent.Get("Content-Length"); cl != "" {
		if v, err := strconv.ParseInt(cl, 10, 64); err == nil && v >= 0 {
			w.clen = v
		}
	}
	// Checked now, so that the handler's first write reports it.
	if n := headerSize(w.sent) + stringsSize(w.trailers); n > maxHeadSize {
		w.tooLargeLocked(fmt.Sprintf("its head (about %d bytes)", n))
	}
}

// keepsBody applies net/http's rule for the body of an HTTP/1 request as
// its response's head goes out, unless the handler is in full-duplex mode
// or there is no body: net/http leaves it to the handler when the
// connection closes after the response (the request or the header says
// "Connection: close", exactly that, as net/http tests it), when 256 KiB or
// more of a body of known length is left, and for an Expect: 100-continue
// body not read to its end; else it discards the rest, and the handler's
// later reads fail (see bodyReader.answered). It reports true if the
// handler may read on: the parent then closes the connection after the
// response (a module's own Connection header is hop-by-hop, dropped in
// the parent). Decided here, as the handler's write, not when the parent
// gets the head: the client's bytes that arrive in between would else
// reach a handler that in-process could not read them.
func (w *responseWriter) keepsBody() bool {
	r := w.req
	switch {
	case w.body == nil || w.fullDuplex || r.ProtoMajor != 1 || r.Close || r.ContentLength == 0:
		return false
	case w.sent.Get("Connection") == "close":
		return true
	}
	return w.body.answered(r.ContentLength)
}

// bodyAllowed reports whether the status permits a body, as net/http's.
func bodyAllowed(status int) bool {
	return (status < 100 || status > 199) && status != http.StatusNoContent && status != http.StatusNotModified
}

// Write adds to the response body, sending the head first if needed.
func (w *responseWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.hijacked() {
		return 0, http.ErrHijacked
	}
	if w.done {
		return 0, errAfterHandler
	}
	if !w.wroteHeader {
		w.writeHeaderLocked(http.StatusOK)
	}
	if !bodyAllowed(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if w.clen >= 0 && w.written+int64(len(p)) > w.clen {
		// Counted all the same, as net/http counts it: every later
		// write fails too, and the response ends cut (see finish).
		w.written += int64(len(p))
		return 0, http.ErrContentLength
	}
	if w.err != nil {
		return 0, w.err
	}
	if err := w.stopped(); err != nil {
		return 0, err
	}
	n := 0
	for n < len(p) {
		switch {
		case w.out.buf == nil && w.out.ring == nil:
			if k := len(p) - n; k >= ringMin && w.win.has(frameCost(min(k, chunkSize))) {
				// Enough for a slot, and the credit to send it: the
				// bytes go in it, and the parent gets them where they
				// are, with no copy on the way. (Bytes that wait for
				// credit wait in a buffer, not in a slot that the chunks
				// in flight before them may need.)
				if slot, ok := w.c.takeSlot(); ok {
					w.out = slot
					continue
				}
			}
			w.out.buf = getBuffer(len(p) - n)
		case w.out.n < len(w.out.space()):
		case w.out.n < chunkSize:
			// A small buffer is full: move to a chunk.
			big := getChunk()
			copy(*big, w.out.data())
			putChunk(w.out.buf)
			w.out.buf = big
		default:
			// A full chunk goes once more bytes follow it, so that a
			// flush or the handler's return right after it travels
			// in the same frame.
			if err := w.sendBodyLocked(0, nil); err != nil {
				return n, err
			}
			continue
		}
		k := copy(w.out.space()[w.out.n:], p[n:])
		w.out.n += k
		n += k
		w.written += int64(k)
	}
	return n, nil
}

// dropBufLocked drops the pending body bytes and releases their buffer.
func (w *responseWriter) dropBufLocked() {
	w.out.release()
	w.out.n = 0
}

// WriteString is Write for a string, without an allocation.
func (w *responseWriter) WriteString(s string) (int, error) {
	return w.Write([]byte(s)) // the compiler avoids the copy for a non-escaping conversion
}

// Flush sends what the handler has written so far, and has the parent
// flush it to the client.
func (w *responseWriter) Flush() { w.FlushError() }

// FlushError is Flush, reporting a failure; http.ResponseController uses it.
func (w *responseWriter) FlushError() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.hijacked() {
		return http.ErrHijacked
	}
	if w.done {
		return errAfterHandler
	}
	if !w.wroteHeader {
		w.writeHeaderLocked(http.StatusOK)
	}
	if err := w.stopped(); err != nil && w.err == nil {
		// The client went away, or the parent gave the request up: as
		// Write does, and as net/http's flush to a connection that
		// failed does, this flush fails, and so does every later one.
		// (What it would send, the parent drops.)
		w.fail(err)
	}
	if w.out.n == 0 && w.headSent && !w.unflushed {
		return w.err
	}
	return w.sendBodyLocked(flagFlush, nil)
}

// SetReadDeadline makes the handler's reads of the request body fail with
// os.ErrDeadlineExceeded from t on, as net/http's does; the zero time
// means none. http.ResponseController uses it.
func (w *responseWriter) SetReadDeadline(t time.Time) error {
	if hc := w.conn.Load(); hc != nil {
		return hc.SetReadDeadline(t)
	}
	w.rdl.set(t)
	return nil
}

// SetWriteDeadline makes the handler's writes fail with
// os.ErrDeadlineExceeded if they must still wait for the parent at t
// (the parent's client reads too slowly), as net/http's fail when the
// connection's write times out; the failure sticks. The zero time means
// none. http.ResponseController uses it.
func (w *responseWriter) SetWriteDeadline(t time.Time) error {
	if hc := w.conn.Load(); hc != nil {
		return hc.SetWriteDeadline(t)
	}
	w.wdl.set(t)
	return nil
}

// EnableFullDuplex asks, as net/http's does, that the handler may go on
// reading the request body after it has started writing the response. The
// parent applies it to its own response when the head arrives.
func (w *responseWriter) EnableFullDuplex() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.fullDuplex = true
	return nil
}

// sendBodyLocked sends the head if it has not gone yet, then the pending
// body bytes (if any, or if flags ask for a flush), waiting for window
// credit, then end if it is not nil: all of it in one write when the pipe is
// idle, so that a small response costs the parent one wake-up.
//
// It sends what the credit allows as soon as it has some, and the rest as
// more comes: a window may be smaller than a pending chunk's cost, since the
// parent returns credit half a window at a time, and waiting for a whole
// chunk's worth would then wait for credit the parent holds back.
func (w *responseWriter) sendBodyLocked(flags uint8, end *outFrame) error {
	if w.aborted {
		return w.err
	}
	if w.err == nil && w.wdl.passed() {
		// As in-process, where every write to the connection fails once
		// its write deadline has passed, whether or not it must wait.
		w.fail(&net.OpError{Op: "write", Net: "tcp", Err: os.ErrDeadlineExceeded})
	}
	var batch [3]outFrame
	fs := batch[:0]
	if w.err == nil && !w.headSent {
		w.headSent = true
		fs = append(fs, outFrame{kind: kindResponse, id: w.id, msg: &responseHead{Status: w.status, Header: w.sent, Trailer: w.trailers, FullDuplex: w.fullDuplex, KeepBody: w.keepsBody()}})
	}
	for w.err == nil && (w.out.n > 0 || flags != 0) {
		least, most := frameCost(min(w.out.n, 1)), frameCost(w.out.n)
		credit, ok, err := w.win.tryTake(least, most)
		if !ok {
			// The credit comes in frames, which this goroutine may be
			// the one to read (see server.lend). Only a wait needs the
			// channels (and makes them).
			w.endLoan()
			credit, err = w.takeCredit(least, most)
		}
		if err != nil {
			w.fail(err)
			break
		}
		if k := credit - frameOverhead; k < w.out.n {
			// A part: it goes now, the rest stays at the front of the
			// buffer. The frames are copied before sendFrames returns.
			b := w.out.space()
			fs = append(fs, outFrame{kind: kindData, id: w.id, data: b[:k]})
			if err := w.c.sendFrames(fs, nil); err != nil {
				w.fail(err)
			}
			fs = fs[:0]
			w.out.n = copy(b, b[k:w.out.n])
			w.unflushed = true
			continue
		}
		f := outFrame{kind: kindData, flags: flags, id: w.id}
		if w.out.n > 0 {
			f.data, f.out = w.out.data(), w.out
			w.out = chunk{} // the frame's now
		}
		fs = append(fs, f)
		w.dropBufLocked() // an empty buffer or slot
		w.unflushed = flags&flagFlush == 0
		break
	}
	if w.err != nil {
		releaseFrames(fs)
		fs = fs[:0]
	}
	if end != nil {
		// The end goes out even after a failure, to release the stream;
		// after a failure, as an abort: the bytes dropped would
		// otherwise be missing from a response that looks whole.
		if w.err != nil {
			w.aborted = true
			fs = append(fs, outFrame{kind: kindAbort, id: w.id})
		} else {
			fs = append(fs, *end)
		}
	}
	if len(fs) == 0 {
		return w.err
	}
	// No cancel: once chosen, the frames must all go out, or the parent
	// could see an end without its head. Only a full queue makes this
	// wait, and the parent always drains the pipe.
	if err := w.c.sendFrames(fs, nil); err != nil && end == nil {
		w.fail(err)
	}
	return w.err
}

// takeCredit waits for window credit, as sendWindow.takeEither, until the
// handler's writes fail (see stopped) or the write deadline passes.
func (w *responseWriter) takeCredit(least, most int) (int, error) {
	for {
		stop := w.stopC()
		credit, err := w.win.takeEither(least, most, stop, w.wdl.wait())
		if err != errCanceled {
			return credit, err
		}
		if err := w.stopped(); err != nil {
			return 0, err
		}
		select {
		case <-stop:
			// The context's end woke the wait, and a stay came with
			// it: wait on.
		default:
			return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.ErrDeadlineExceeded}
		}
	}
}

// tooLargeLocked fails a response whose head or trailers, described by
// what, exceed maxHeadSize: it ends the stream with kindAbort, which the
// parent answers with 502 Bad Gateway if nothing was sent yet, else by
// aborting the client's connection, and later writes fail.
func (w *responseWriter) tooLargeLocked(what string) error {
	err := fmt.Errorf("subproc: the response to %s %s cannot be sent: %s exceeds the %d bytes a message to the parent can carry", w.req.Method, w.req.URL.Path, what, maxHeadSize)
	fmt.Fprintln(os.Stderr, err)
	w.fail(err)
	w.aborted = true
	w.dropBufLocked()
	w.c.send(outFrame{kind: kindAbort, flags: flagTooLarge, id: w.id}, nil)
	return w.err
}

// sendLocked sends a frame; a failure is remembered for later writes.
func (w *responseWriter) sendLocked(f outFrame) {
	if w.err != nil {
		f.out.release()
		return
	}
	// No cancel: a failure here would hold back the final head, and an
	// end without a head is a protocol error for the parent.
	if err := w.c.send(f, nil); err != nil {
		w.fail(err)
	}
}

func (w *responseWriter) fail(err error) {
	if w.err == nil {
		if stopErr := w.stopped(); stopErr != nil {
			err = stopErr
		}
		w.err = err
	}
}

// finish completes the response after the handler returned: the rest of the
// body, then the trailers.
func (w *responseWriter) finish() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.hijacked() {
		w.done = true // the stream is the conn's now
		return
	}
	if !w.wroteHeader {
		w.writeHeaderLocked(http.StatusOK)
	}
	w.done = true
	if (w.err != nil || w.stopped() != nil) && !w.aborted {
		// A write failed, or could fail: in-process, net/http would
		// have closed the connection, with the response cut short, and
		// the client would see it cut. So does the parent, at the
		// abort. A write that timed out (SetWriteDeadline) ends here;
		// so does a handler that returned at its context's end, which,
		// when the parent waits for its answer, means that this child
		// is ending (its reads from the parent failed): an end would
		// make what it wrote look whole. The parent, which does not wait
		// for a request it canceled, drops the abort.
		w.dropBufLocked()
		w.c.send(outFrame{kind: kindAbort, id: w.id}, nil)
		return
	}
	end := outFrame{kind: kindEnd, id: w.id}
	if t := w.trailerLocked(); len(t) > 0 {
		if n := headerSize(t); n > maxHeadSize {
			// What the handler wrote goes first; the abort then ends the
			// stream instead of the end.
			w.sendBodyLocked(0, nil)
			w.tooLargeLocked(fmt.Sprintf("its trailers (about %d bytes)", n))
		} else {
			end.msg = &bodyEnd{Trailer: t}
		}
	}
	w.sendBodyLocked(0, &end)
	w.dropBufLocked()
}

// trailerLocked collects the trailers: the declared keys' values, and keys
// set with http.TrailerPrefix.
func (w *responseWriter) trailerLocked() http.Header {
	var t http.Header
	for _, k := range w.trailers {
		if v, ok := w.header[k]; ok {
			if t == nil {
				t = make(http.Header)
			}
			t[k] = v
		}
	}
	for k, v := range w.header {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			if t == nil {
				t = make(http.Header)
			}
			t[http.CanonicalHeaderKey(name)] = v
		}
	}
	return t
}

// abort ends the response of a handler that panicked: with 500 Internal
// Server Error if it had written nothing, else by aborting the client's
// connection.
//
// A panic with http.ErrAbortHandler always aborts, as in net/http.
func (w *responseWriter) abort(always bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return
	}
	w.done = true
	w.dropBufLocked()
	w.err = nil
	if w.aborted || w.hijacked() {
		return // the stream is ended
	}
	if always || w.wroteHeader || w.headSent {
		w.c.send(outFrame{kind: kindAbort, id: w.id}, nil)
		return
	}
	h := http.Header{}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	body := []byte(http.StatusText(http.StatusInternalServerError) + "\n")
	w.c.send(outFrame{kind: kindResponse, id: w.id, msg: &responseHead{Status: http.StatusInternalServerError, Header: h}}, nil)
	w.c.send(outFrame{kind: kindData, id: w.id, data: body}, nil)
	w.c.send(outFrame{kind: kindEnd, id: w.id}, nil)
}
