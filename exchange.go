package subproc

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the parent's side of one request's exchange with a child,
// once the request is on a stream: an exchange pumps the client's body to
// the child (bodySender) and the child's response to the client (run and
// the helpers named for each frame it handles: writeHead, writeData,
// writeTrailers, abort), and classifies what ends it early: the client
// leaving, the deadline passing, the child dying. It is modelled on
// httputil.ReverseProxy's ServeHTTP, handleUpgradeResponse and
// switchProtocolCopier. The states a stream goes through, and what each
// side may send in each, are written down in PROTOCOL.md.

// giveUp drops what the child sends for s from now on and tells the child
// the request is gone, so that its handler's context is canceled.
//
// The request's MaxInFlight place, if it still holds it, goes to the
// handler, which runs on in the child until it sees its context end: it
// is given back once the handler has ended, or the child has (see forget),
// so that clients that leave at once cannot make the child run more
// handlers than MaxInFlight.
func giveUp(ctx context.Context, c *child, s *stream) {
	s.abandon()
	x := &s.x
	place := x.h != nil && !x.placeFreed && x.h.admission != nil
	if place {
		x.placeFreed = true
	}
	at := x.ended // the context's end, if stayOn saw it first: StuckTimeout counts from it
	if at.IsZero() {
		at = time.Now()
	}
	if !c.forget(s, place, at) && place {
		x.h.unadmit() // the handler had ended
	}
	var flags uint8
	if ctx.Err() == context.DeadlineExceeded {
		flags = flagDeadline
	}
	// Posted: a child that reads nothing would otherwise hold the
	// request's goroutine, whose client has gone, until it is killed.
	c.post(outFrame{kind: kindCancel, flags: flags, id: s.id})
}

// proxy copies the request body to the child and the child's response to w.
// It returns true, having written nothing, if the child died without reading
// the request and before any of the request's body was consumed: then the
// request may go to the next child. admitted says whether the request still
// holds its MaxInFlight place (see exchange.placeFreed).
func (h *Handle) proxy(w http.ResponseWriter, r *http.Request, c *child, s *stream, admitted bool) (retry bool) {
	s.x = exchange{h: h, w: w, r: r, ctx: r.Context(), c: c, s: s, placeFreed: !admitted}
	returned := false
	defer func() {
		s.disarmCut()
		if s.x.stopCut != nil {
			s.x.stopCut()
		}
		c.finished(s)
		defer s.releaseHeads() // after giveUp's abandon, below: nothing is charged later
		if !returned {
			// A panic (an aborted response, or one of w's own): what
			// is queued, and what the child sends later, is dropped, so
			// that the ring slots it holds come back, and the handler's
			// context is canceled, as the client's going away would:
			// else it would wait for window credit for good.
			giveUp(r.Context(), c, s)
		}
	}()
	retry = s.x.run()
	returned = true
	return retry
}

// An exchange is one request's exchange with a child, in the parent: the
// request r from the client, answered on w, carried by stream s of child c.
// Its methods run on the goroutine of ServeHTTP, but for the body pump's.
type exchange struct {
	h   *Handle
	w   http.ResponseWriter
	r   *http.Request
	ctx context.Context // r's
	c   *child
	s   *stream

	rc   *http.ResponseController // made when first needed (see controller): most responses need none
	body *bodySender              // nil for a request without a body

	// The child's handler ends at the same deadline, and what it sends
	// then arrives after it: too late. Checked against the clock, as the
	// context's own timer may not have fired yet.
	deadline    time.Time
	hasDeadline bool

	declared    map[string]bool // trailers announced in the response head
	header      http.Header     // w's header before the first 1xx head, if one came (see replyError)
	started     bool            // the final response head was written to w
	bodyWritten bool            // body bytes were written to w
	// writerChecked is set once the exchange has looked whether w is the
	// server's own writer, which may be handed a slot's bytes (see
	// serverWriter), and set directWriter if it is.
	writerChecked, directWriter bool
	cutShort                    bool // a write to w failed after the stream was cut (see stream.cutWrites)

	// placeFreed is set once the request does not hold its MaxInFlight
	// place: freePlace gave it back early, or an earlier exchange of the
	// request did (a retry). ServeHTTP reads it as proxy returns or
	// panics, and then does not give the place back itself.
	placeFreed bool

	// graceOver, once the request's context has ended and the exchange
	// waits on for the module's response all the same (see stayOn), is
	// closed by grace when the module has been silent too long; nil
	// before.
	graceOver chan struct{}
	grace     *time.Timer
	graceHeld bool      // grace was stopped before it fired (see holdGrace)
	ended     time.Time // when stayOn first saw the context's end: StuckTimeout counts from it
	// graceReads is the body pump's reads as the grace began (see
	// pumping).
	graceReads int64
	// noBody is set once the final head is written if nothing the module
	// writes after it can reach the client: a HEAD request's, or a status
	// without a body (net/http drops such writes).
	noBody bool

	cutArmed    bool        // the stream's cut is armed (see armCut)
	headWritten atomic.Bool // started, for cutAtDeadline's goroutine
	// stopCut, if not nil, stops the cut at the request's deadline (see
	// armCut).
	stopCut func() bool
}

// controller returns w's ResponseController.
func (x *exchange) controller() *http.ResponseController {
	if x.rc == nil {
		x.rc = http.NewResponseController(x.w)
	}
	return x.rc
}

// late reports whether the request's deadline has passed, by the context
// or by the clock.
func (x *exchange) late() bool {
	return x.ctx.Err() == context.DeadlineExceeded || x.hasDeadline && !time.Now().Before(x.deadline)
}

// run starts the body pump and writes what the child sends for the stream
// to w until the response ends, is aborted, or the exchange fails. It
// returns true, having written nothing, if the request may go to the next
// child (see proxy). It panics with http.ErrAbortHandler to abort a
// response that had started, as httputil.ReverseProxy does.
func (x *exchange) run() (retry bool) {
	if hasBody(x.r) {
		x.body = startBody(x.c, x.s, x.r, x.w, x.controller(), x.freePlace)
		defer x.body.halt()
	}
	x.deadline, x.hasDeadline = x.ctx.Deadline()
	defer func() {
		if x.grace != nil {
			x.grace.Stop()
		}
	}()
	for {
		x.resumeGrace()
		ev, err := x.s.next(x.done())
		if err == nil && x.graceOver == nil && x.ctx.Err() != nil {
			// The context ended while what the child sent waited: the
			// stay begins now, so that what follows does not take its
			// end for the request's (see done).
			x.stayOn()
		}
		x.holdGrace()
		if err == nil && x.hasDeadline && x.late() {
			// What the child sent at its deadline, which has passed here
			// too, comes too late: the request has timed out.
			ev.release()
			err = errCanceled
		}
		if err == errCanceled {
			if x.stayOn() {
				continue
			}
			x.canceled()
			return false
		}
		if err != nil {
			return x.failed(err)
		}
		switch ev.kind {
		case kindResponse:
			if !x.writeHead(ev) {
				continue // a 1xx head
			}
			if x.noBody && x.graceOver != nil {
				x.canceled() // nothing more can reach the client
				return false
			}
		case kindData:
			if !x.writeData(ev) {
				return false
			}
		case kindEnd:
			if x.cutShort {
				// Cut at a drain's end: the client has not got it all.
				x.h.count(&x.h.stats.Aborted)
				panic(http.ErrAbortHandler)
			}
			x.writeTrailers(ev)
			return false
		case kindAbort:
			x.abort(ev)
			return false
		case kindHijack:
			x.tunnel()
			return false
		}
	}
}

// canHijack reports whether w, or a ResponseWriter it wraps (Unwrap, as
// http.ResponseController follows it), is an http.Hijacker.
func canHijack(w http.ResponseWriter) bool {
	for {
		switch t := w.(type) {
		case http.Hijacker:
			return true
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return false
		}
	}
}

// tunnel serves a stream whose handler hijacked the connection (see
// PROTOCOL.md, "Upgrades"): it hijacks the client's connection and copies
// raw bytes both ways, each direction under its stream window, as
// httputil.ReverseProxy's switchProtocolCopier does, until the child closes
// its conn (kindAbort) or dies, or the client's connection fails. The
// parent writes no head of its own: the handler wrote its 101 into its
// conn, and those bytes come first; or the handler had started a response,
// which the parent has written and flushed, and the bytes follow it.
func (x *exchange) tunnel() {
	h := x.h
	x.body.halt() // the child hijacks only once the body is complete
	conn, brw, err := x.controller().Hijack()
	if err != nil {
		if x.started {
			// The response the handler started went out: the client can
			// only see it end. (proxy gives the stream up.)
			h.count(&h.stats.Aborted)
			panic(http.ErrAbortHandler)
		}
		giveUp(x.ctx, x.c, x.s) // the handler's conn fails
		h.count(&h.stats.BadGateway)
		x.replyError(http.StatusBadGateway, " hijacked the connection, which the parent cannot do here: %v", err)
		return
	}
	x.started = true
	// The Server's timeouts no longer apply, nor the request's deadline:
	// the module's conn has deadlines of its own.
	if x.stopCut != nil {
		x.stopCut()
	}
	conn.SetDeadline(time.Time{})
	// The child's abort or failure, and the drain's end, still cut.
	x.s.armCut(nil, conn)
	stop := make(chan struct{}) // closed when the tunnel ends
	up := make(chan struct{})   // closed when pumpClient returns
	gone := make(chan struct{}) // closed by pumpClient if the client's connection failed
	// The client's connection failed, seen by either goroutine: the
	// stream is given up, as a request whose client went away. The
	// handler's conn fails, and the child's kindAbort, when it comes,
	// drops the parent's last record of the tunnel; until then that
	// record counts as a handler running on (see checkStuck), and holds
	// the request's MaxInFlight place. The parent holds no more for it:
	// a child that never sends the abort is found stuck, it does not
	// grow the parent.
	end := sync.OnceFunc(func() { giveUp(x.ctx, x.c, x.s) })
	go func() {
		defer close(up)
		x.pumpClient(conn, brw.Reader, stop, gone, end)
	}()
	defer func() {
		close(stop)
		conn.Close() // wakes pumpClient's read
		<-up
	}()
	for {
		ev, err := x.s.next(gone)
		if err != nil {
			// The child died: its connections end with it. Or the
			// client's connection failed, and pumpClient gave the
			// stream up: the child's abort would never reach it.
			x.s.abandon()
			return
		}
		switch ev.kind {
		case kindData:
			if !plainConn(conn) {
				ev.unshare()
			}
			_, werr := ev.writeTo(conn, 0)
			if werr != nil {
				end()
				return
			}
			if n := x.s.consumeCost(ev.charge()); n > 0 {
				x.c.sendWindowUpdate(x.s.id, n, stop)
			}
		case kindEnd:
			// The handler closed its conn for writing.
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
		case kindAbort:
			// The handler closed its conn: the client's closes with it.
			return
		}
	}
}

// pumpClient copies what the client sends on its hijacked connection
// (first what net/http had read ahead into br) to the child, within the
// credit the child grants, then the end of it: kindEnd at EOF; if the read
// fails before stop is closed, it calls end, and then it closes gone.
func (x *exchange) pumpClient(conn net.Conn, br *bufio.Reader, stop <-chan struct{}, gone chan<- struct{}, end func()) {
	var src io.Reader = conn
	if n := br.Buffered(); n > 0 {
		src = io.MultiReader(io.LimitReader(br, int64(n)), conn)
	}
	c, s := x.c, x.s
	for {
		credit, err := s.win.take(frameCost(1), frameCost(chunkSize), stop)
		if err != nil {
			return
		}
		n := credit - frameOverhead
		buf := getChunk()
		m, rerr := src.Read((*buf)[:n])
		switch {
		case m == 0:
			s.win.add(credit)
			putChunk(buf)
		case m < n:
			s.win.add(n - m)
		}
		if m > 0 && c.send(outFrame{kind: kindData, id: s.id, data: (*buf)[:m], out: chunk{buf: buf}}, stop) != nil {
			return
		}
		switch {
		case rerr == io.EOF:
			c.send(outFrame{kind: kindEnd, id: s.id}, stop)
			return
		case rerr != nil:
			select {
			case <-stop: // the tunnel ended here
			default:
				end()
				close(gone)
			}
			return
		}
	}
}

// cancelGrace is how long the parent waits for each next message of a
// module's response once the request's context has ended, not at its
// deadline (see exchange.stayOn).
const cancelGrace = time.Second

// stayOn answers the end of the request's context before its deadline by
// waiting on for the module's response, which net/http delivers
// in-process: the client may still read it. net/http cancels the context
// of an HTTP/1 request whose client half-closed its connection (as
// "nc -N", HTTP/1.0 tools and some proxies do once they have sent the
// request), and a middleware may cancel it. The handler's context ends
// (kindCancel with flagMayRead); its writes go on. A client that has gone
// for good fails the first write that reaches it (see writeData), and
// the request is given up then; so is a response none of whose body can
// reach the client (noBody), once its head is out. The parent waits for
// each next message of the module no longer than cancelGrace, and not
// past the request's deadline: then run gives the request up (see
// canceled). The grace counts the module's silence only: not the time
// the parent spends writing to a client that reads slowly (see
// holdGrace), nor the time the client still sends the request's body,
// which the module may wait for. A module whose handler honours its
// context, as most do, ends its response at once.
//
// stayOn is called at each end of the wait: it reports false, having
// done nothing, if the exchange must end now: the deadline passed, the
// grace is over, nothing more can reach the client, or a cut write (see
// stream.cutWrites) canceled the request.
func (x *exchange) stayOn() bool {
	if x.cutShort || x.noBody || x.late() || x.ctx.Err() != context.Canceled {
		return false
	}
	if x.graceOver != nil && !x.pumping() {
		return false // the grace is over
	}
	if x.graceOver == nil {
		x.ended = time.Now()
		x.c.post(outFrame{kind: kindCancel, flags: flagMayRead, id: x.s.id})
	}
	over := make(chan struct{})
	x.graceOver = over
	x.grace = time.AfterFunc(x.graceLeft(), func() { close(over) })
	if x.body != nil {
		x.graceReads = x.body.reads.Load()
	}
	return true
}

// pumping reports whether the client still sends the request's body and
// the module takes it: the body pump waits for the client now, or has
// read some of the body since the grace began. (A pump that waits for a
// child that reads nothing, frozen, or for credit from a module that
// takes nothing, is not.)
func (x *exchange) pumping() bool {
	b := x.body
	if b == nil {
		return false
	}
	select {
	case <-b.done:
		return false
	default:
		return b.reading.Load() || b.reads.Load() != x.graceReads
	}
}

// holdGrace stops the grace's clock (see stayOn) while the parent handles
// what the module sent, which may mean a long write to a client that
// reads slowly; resumeGrace starts it again, anew, as run waits for the
// module once more. A grace that was over before holdGrace stays over.
func (x *exchange) holdGrace() {
	if x.grace != nil {
		x.graceHeld = x.grace.Stop()
	}
}

func (x *exchange) resumeGrace() {
	if x.graceHeld {
		x.graceHeld = false
		x.grace.Reset(x.graceLeft())
	}
}

// done returns the channel that ends the exchange's waits for the child:
// the request context's Done, until stayOn makes it graceOver.
func (x *exchange) done() <-chan struct{} {
	if x.graceOver != nil {
		return x.graceOver
	}
	return x.ctx.Done()
}

// graceLeft returns how long stayOn waits for the module's next message.
func (x *exchange) graceLeft() time.Duration {
	if x.hasDeadline {
		return min(cancelGrace, time.Until(x.deadline))
	}
	return cancelGrace
}

// canceled ends an exchange whose request's context ended: the client went
// away, or the deadline passed (504, or an abort once the response has
// started).
func (x *exchange) canceled() {
	h := x.h
	giveUp(x.ctx, x.c, x.s)
	if x.late() {
		h.count(&h.stats.Timeouts)
		if x.started {
			panic(http.ErrAbortHandler)
		}
		x.replyError(http.StatusGatewayTimeout, " did not answer before the request's deadline (%v)", context.Cause(x.ctx))
		return
	}
	if x.cutShort {
		// A cut write (see stream.cutWrites) canceled the request, as
		// net/http does at a failed write.
		h.count(&h.stats.Aborted)
		panic(http.ErrAbortHandler)
	}
	if x.noBody {
		// The client has all it can get: what the module would send
		// next, net/http would drop. Given up, not cut.
		return
	}
	if x.started {
		// Usually nobody reads this either. But the client may still be
		// there (see stayOn), and the module stopped answering: it must
		// see the response cut, not end as if whole. Not counted as
		// Aborted: the client left first.
		panic(http.ErrAbortHandler)
	}
	// The same: not an empty 200 that looks like the module's answer.
	if x.graceOver != nil {
		x.replyError(http.StatusServiceUnavailable, ": request canceled (%v), and no answer from the module came in the %v after", context.Cause(x.ctx), cancelGrace)
		return
	}
	x.replyError(http.StatusServiceUnavailable, ": request canceled: %v", context.Cause(x.ctx))
}

// replyError answers the request, whose response has not started, with
// code and a text that names the module, "subproc: module %q", followed
// by format. It halts the body pump first: an http.MaxBytesReader's read
// could otherwise write w's header meanwhile (see bodySender.hdrMu).
// After a 1xx head, w's header is first what it was before that head:
// the module's fields (a Set-Cookie, a Cache-Control) are not the
// parent's answer's.
//
// Over HTTP/1, an answer to a request whose body is not all read says
// "Connection: close". net/http would otherwise, before it writes the
// answer's head, read what is left of the body, up to 256 KiB, to discard
// it; and a client that sends the rest slowly, or only once it has the
// answer, would hold the answer back, for ever if it never sends. (Unless
// halt interrupted a read under way: then net/http's read fails at once.
// Whether a read was under way is the pump's timing, not the client's.)
func (x *exchange) replyError(code int, format string, args ...any) {
	x.body.halt()
	dst := x.w.Header()
	if x.header != nil {
		clear(dst)
		maps.Copy(dst, x.header)
	}
	if x.body != nil && !x.body.whole && x.r.ProtoMajor == 1 {
		dst.Set("Connection", "close")
	}
	http.Error(x.w, fmt.Sprintf("subproc: module %q", x.h.name)+fmt.Sprintf(format, args...), code)
}

// failed ends an exchange whose stream failed with err (the child died, or
// broke the protocol): 502 before the response started, an abort after. It
// returns true if the request never reached the module and may be retried.
func (x *exchange) failed(err error) (retry bool) {
	h := x.h
	x.s.abandon()
	var nd *notDeliveredError
	if errors.As(err, &nd) && !x.started {
		x.body.halt()
		if !x.s.bodyTouched.Load() {
			return true
		}
	}
	if !x.started {
		h.count(&h.stats.BadGateway)
		x.replyError(http.StatusBadGateway, " failed before it answered: %v; it is being restarted", err)
		return false
	}
	h.count(&h.stats.Aborted)
	panic(http.ErrAbortHandler)
}

// writeHead writes a response head of the child's to w, translating its
// header: hop-by-hop fields are dropped, the announced trailers recorded.
// It reports whether the head was the final one.
func (x *exchange) writeHead(ev event) (final bool) {
	w := x.w
	defer x.lockHeader()()
	if ev.head.FullDuplex {
		// Else net/http, at the first write of an HTTP/1 response,
		// discards what is left of the request body, as it would for the
		// handler in-process.
		x.controller().EnableFullDuplex()
		if x.body != nil {
			x.body.fullDuplex = true
		}
	}
	// The module's header map started as w's (see
	// requestHead.ResponseHeader); each head, 1xx or final, makes w's what
	// the module's was then, as net/http writes a handler's current map at
	// each WriteHeader.
	announced := ev.head.Header["Trailer"] // hop-by-hop, but announces the trailers
	removeHopByHop(ev.head.Header)
	dst := w.Header()
	if ev.head.Status < 200 && x.header == nil {
		x.header = dst.Clone() // for replyError
	}
	adoptHeader(dst, ev.head.Header) // decoded for this response alone
	if ev.head.Status < 200 && ev.head.Status != http.StatusSwitchingProtocols {
		defer x.s.uncharge(ev)
		if ev.head.Status == http.StatusContinue && x.body != nil && x.body.continued.Load() {
			// The module's own 100, after its first read of the body
			// made net/http send one: in-process that read would have
			// sent none after it.
			return false
		}
		// net/http writes a 1xx head to the client at once, and waits
		// there for a client that reads nothing.
		x.armCut()
		w.WriteHeader(ev.head.Status)
		return false
	}
	// (net/http's test of the header, for the close it keeps the body
	// from, is exactly this one: a "Close" does not count.)
	if x.body != nil && !ev.head.FullDuplex && x.r.ProtoMajor == 1 && !x.r.Close && dst.Get("Connection") != "close" && x.body.beforeHead(ev.head.KeepBody) {
		dst.Set("Connection", "close")
	}
	if len(ev.head.Trailer) > 0 {
		x.declared = make(map[string]bool, len(ev.head.Trailer))
		for _, k := range ev.head.Trailer {
			x.declared[k] = true
		}
		dst["Trailer"] = announced
	}
	w.WriteHeader(ev.head.Status)
	x.started = true
	x.noBody = x.r.Method == http.MethodHead || !bodyAllowed(ev.head.Status)
	x.armCut()
	return true
}

// armCut arms the stream's cut (see stream.cutWrites) once a write to w
// may wait for the client: when the response has started, or a 1xx head
// goes out. At the request's deadline, if it has one, and at the child's
// failure or abort, or the end of its drain, a write that waits for a
// client that reads nothing fails, and the response ends aborted (or
// without its final head), as it would have without the wait. (Until
// then nothing written waits: net/http buffers the final head.)
func (x *exchange) armCut() {
	if x.started {
		x.headWritten.Store(true)
	}
	if x.cutArmed {
		return
	}
	x.cutArmed = true
	x.s.armCut(x.w, nil)
	if x.hasDeadline {
		// At the deadline, not at an earlier end of the context: the
		// client may still read then (see stayOn).
		x.stopCut = time.AfterFunc(time.Until(x.deadline), x.cutAtDeadline).Stop
	}
}

// cutAtDeadline is the cut at the request's deadline. While only 1xx
// heads went out, it leaves the 504 that follows abortLinger to reach the
// client: a deadline in the past would fail it (over HTTP/2, reset the
// stream at once).
func (x *exchange) cutAtDeadline() {
	if x.headWritten.Load() {
		x.s.cutWrites()
		return
	}
	x.s.cutWritesAt(time.Now().Add(abortLinger))
}

// writeData writes a data frame's bytes to w and returns their credit to
// the child. It reports false if the client is gone, the exchange given up.
func (x *exchange) writeData(ev event) bool {
	defer ev.release() // if w panics; else it is released already
	if ev.ring != nil && !x.writerChecked {
		x.writerChecked, x.directWriter = true, serverWriter(x.w)
	}
	if ev.ring != nil && !x.directWriter {
		ev.unshare()
	}
	data := ev.data()
	var err error
	if ev.ring != nil && !x.bodyWritten {
		// net/http sniffs a Content-Type from the first bytes (at most
		// sniffLen) written to a header that has none, and so would
		// read shared memory, which the parent does not parse (see
		// bodyRing): they are written first, from a copy. net/http
		// buffers them, and copies what follows into the same buffer
		// before it sniffs.
		if _, typed := x.w.Header()["Content-Type"]; !typed {
			private := getBuffer(sniffLen)
			k := copy(*private, data[:min(len(data), sniffLen)])
			_, err = x.w.Write((*private)[:k])
			putChunk(private)
			data = data[k:]
		}
	}
	x.bodyWritten = x.bodyWritten || ev.n > 0
	if err == nil && len(data) > 0 {
		_, err = x.w.Write(data)
	}
	ev.release()
	if err != nil && !errors.Is(err, http.ErrBodyNotAllowed) {
		if x.late() {
			x.canceled() // cut at the deadline: aborts
			return false
		}
		if x.s.wasCut() {
			// The stream's next events end the response: its abort, its
			// failure, or, cut at a drain's end, whatever the stopped
			// child sends last. No credit goes back meanwhile.
			x.cutShort = true
			return true
		}
		// The client is gone.
		giveUp(x.ctx, x.c, x.s)
		return false
	}
	// Credit goes back half a window at a time, with the window's growth
	// while the stream drains quickly (see recvWindow.consume).
	if n := x.s.consumeCost(ev.charge()); n > 0 {
		x.c.sendWindowUpdate(x.s.id, n, x.done())
	}
	if ev.flags&flagFlush != 0 {
		x.controller().Flush()
	}
	return true
}

// sniffLen is how many bytes of a body net/http reads to sniff its
// Content-Type (http.DetectContentType).
const sniffLen = 512

// lockHeader returns once the body pump cannot write w's header, until the
// function it returns is called. Only an http.MaxBytesReader, and the
// first read of an Expect: 100-continue body, do that (see
// bodySender.hdrMu); for any other body it returns at once. The pump's
// read may be waiting for a client that sends slowly: then so does the
// head, until the client sends more or the request ends. (Halting the pump
// instead would leave the module's body without its end.)
func (x *exchange) lockHeader() (unlock func()) {
	b := x.body
	if b == nil || !b.maxBytes && !b.expect {
		return func() {}
	}
	if !b.hdrMu.TryLock() {
		// The pump is reading, perhaps waiting for a client that sends
		// slowly: wait for its read, or for the request's end, which
		// halts it.
		locked := make(chan struct{})
		go func() {
			b.hdrMu.Lock()
			close(locked)
		}()
		select {
		case <-locked:
		case <-x.done():
			b.halt()
			<-locked
		}
	}
	return b.hdrMu.Unlock
}

// writeTrailers sets the trailers of the response's end in w's header:
// those announced in the head under their names, the others with
// http.TrailerPrefix, as a handler in-process would.
func (x *exchange) writeTrailers(ev event) {
	dst := x.w.Header()
	for k, v := range ev.trailer {
		if x.declared[k] {
			dst[k] = v
		} else {
			dst[http.TrailerPrefix+k] = v
		}
	}
}

// freePlace gives the request's MaxInFlight place back before ServeHTTP
// returns: it waits for a client, not for the module (see halt).
func (x *exchange) freePlace() {
	if !x.placeFreed {
		x.placeFreed = true
		x.h.unadmit()
	}
}

// abort ends an exchange that the child aborted: 502 if its head was too
// large to send, or for the module's head budget (flagOverBudget), and
// nothing was written; else an aborted response.
func (x *exchange) abort(ev event) {
	h := x.h
	if ev.flags&(flagTooLarge|flagOverBudget) != 0 {
		// The handler runs on, its writes failing: its context ends
		// and its body fails, as for a client gone, so that it does
		// not wait for ever for a body the parent no longer sends.
		giveUp(x.ctx, x.c, x.s)
	}
	switch {
	case x.started:
	case ev.flags&flagTooLarge != 0:
		h.count(&h.stats.BadGateway)
		x.replyError(http.StatusBadGateway, ": its response's head exceeds the %d bytes a message from the module can carry", maxHeadSize)
		return
	case ev.flags&flagOverBudget != 0:
		h.count(&h.stats.BadGateway)
		x.replyError(http.StatusBadGateway, ": its response's head (%d bytes decoded) does not fit in the %d MiB that the parent holds of the module's heads larger than %d KiB, which its responses to slow clients hold now: make its heads smaller", ev.cost, headBudgetSize>>20, freeHeadCost>>10)
		return
	case x.s.cutAtOnce():
		// The child's drain ended before its handler answered, and the
		// handler returned as its context ended: as if the child had
		// died then.
		h.count(&h.stats.BadGateway)
		x.replyError(http.StatusBadGateway, " did not answer before its child's drain ended (Shutdown's context, or Options.ShutdownTimeout for a replaced child)")
		return
	}
	h.count(&h.stats.Aborted)
	panic(http.ErrAbortHandler)
}

// A bodySender copies a request's body to the child, within the window the
// child grants, until the body ends or it is halted.
type bodySender struct {
	c    *child
	s    *stream
	r    *http.Request
	rc   *http.ResponseController // r's
	stop chan struct{}            // closed by halt or close
	done chan struct{}            // closed when pumpRequestBody returns
	once sync.Once                // halt's
	// stopOnce closes stop.
	stopOnce sync.Once

	// reading is set while pumpRequestBody reads r.Body. It checks stop
	// after setting it, so that halt, having closed stop, finds it clear
	// only if no read is under way or will start.
	reading atomic.Bool
	// reads counts the reads of r.Body that returned bytes: the client
	// sends, and the module takes them (see exchange.pumping).
	reads atomic.Int64

	// hdrMu is held by the reads of r.Body that may write to w from the
	// pump's goroutine (see maxBytes and expect), and by the exchange
	// while it writes a head (see lockHeader).
	hdrMu sync.Mutex

	// maxBytes is set when r.Body is an http.MaxBytesReader of an HTTP/1
	// request: the read that crosses its limit writes "Connection: close"
	// into the response's header map, which would race with the exchange
	// writing the module's head there (a concurrent map write, fatal to
	// the whole process), so every read holds hdrMu. expect is set for an HTTP/1
	// request with "Expect: 100-continue": net/http's first read of its
	// body writes "100 Continue" into the connection, from the pump's
	// goroutine, which would race with the exchange writing a 1xx head
	// there (net/http's WriteHeader of a 1xx other than 100 does not
	// exclude that write); so that first read holds hdrMu too.
	maxBytes, expect bool
	// expectPending is set, for the pump alone, until the first read of
	// an Expect: 100-continue body has returned bytes or an error (see
	// readBody).
	expectPending bool
	// continued is set, under hdrMu, once that first read has begun: net/http
	// has written "100 Continue", or will not (a final head went first).
	continued atomic.Bool

	// stalled, if not nil, is called by halt before it waits for a read
	// that it cannot interrupt; fixed.
	stalled func()

	// fullDuplex is set, by the exchange's goroutine, which alone calls
	// halt, once the response is full duplex (see halt).
	fullDuplex bool

	// slots is set when r.Body is the server's own reader (serverBody):
	// only then may the pump read into a slot. Fixed.
	slots bool
	// limited is set when the pump may read into slots and r.Body is
	// behind an http.MaxBytesReader: a read into a slot asks for no more
	// than it lets through (see serverBody). Fixed.
	limited bool

	// slow is set, for the pump alone, while the body's last read
	// returned less than a slot's worth though it had room for more:
	// the client sends slowly, and its next read does not hold a slot
	// while it waits (see conn.takeReadSlot).
	slow bool

	closing atomic.Bool // set by close

	// whole is set by the pump, before it returns, once it has read the
	// body to its end: after halt it may be read.
	whole bool
}

// isMaxBytesReader reports whether body is an http.MaxBytesReader, whose
// type net/http does not export.
func isMaxBytesReader(body io.ReadCloser) bool {
	return reflect.TypeOf(body) == maxBytesReaderType
}

var maxBytesReaderType = reflect.TypeOf(http.MaxBytesReader(nil, http.NoBody, 0))

// isExpectContinueReader reports whether body is net/http's body of an
// HTTP/1 request with "Expect: 100-continue", which writes "100 Continue"
// at its first read; its type is not exported.
func isExpectContinueReader(body io.ReadCloser) bool {
	return pointerTo(reflect.TypeOf(body), "net/http", "expectContinueReader")
}

// pointerTo reports whether t is a pointer to the type named name in the
// package at path pkg: for the types of net/http and x/net/http2 that they
// do not export.
func pointerTo(t reflect.Type, pkg, name string) bool {
	return t != nil && t.Kind() == reflect.Pointer && t.Elem().Name() == name && t.Elem().PkgPath() == pkg
}

// serverBody reports whether body is an HTTP server's own reader of a
// request body, maybe behind http.MaxBytesReader: net/http's for HTTP/1
// (with "Expect: 100-continue" or not) and HTTP/2, or golang.org/x/net/http2's.
// Those copy the client's bytes into p and do nothing else with it. Only
// their p may be a slot of the down ring, which the child maps too: any
// other reader (a middleware's) may use all of p as scratch space, as
// io.Reader allows, and leave there bytes the child must not see (the
// plaintext of a reader that encrypts in place), or read p back after its
// read (a tee to an audit log, a checksum), when the child may have
// rewritten it.
//
// left is the fewest bytes that the http.MaxBytesReaders in front of body
// still let through, or -1 if there are none. A MaxBytesReader with n bytes
// left reads up to n+1 into p, the last to see whether the body goes past
// n: so a read into a slot must ask for no more than n, or the child sees
// a byte that the limit keeps from it.
func serverBody(body io.ReadCloser) (own bool, left int64) {
	left = -1
	v := reflect.ValueOf(body)
	for v.Kind() == reflect.Pointer && !v.IsNil() {
		t := v.Type()
		var inner string // the field of a wrapper that holds what it wraps
		switch {
		case pointerTo(t, "net/http", "body"), pointerTo(t, "net/http", "http2requestBody"),
			pointerTo(t, "golang.org/x/net/http2", "requestBody"):
			return true, left
		case pointerTo(t, "net/http", "expectContinueReader"):
			inner = "readCloser"
		case t == maxBytesReaderType:
			inner = "r"
			n := v.Elem().FieldByName("n")
			if n.Kind() != reflect.Int64 {
				return false, -1 // not the net/http this was written for
			}
			if left < 0 || n.Int() < left {
				left = n.Int()
			}
		default:
			return false, -1
		}
		f := v.Elem().FieldByName(inner)
		if f.Kind() != reflect.Interface || f.IsNil() {
			return false, -1
		}
		v = f.Elem()
	}
	return false, -1
}

// serverWriter reports whether w is an HTTP server's own ResponseWriter
// (not a middleware's) over a connection of its own (see serverConn). Those
// copy what they are given, or hand it to the kernel, and the parent hands
// them the bytes of an up ring's slot as they are (the first bytes of a
// body whose type net/http sniffs aside: see writeData). Any other writer
// may read what it is given (to compress it, hash it, look into it) while
// the child rewrites it, and so see bytes other than those it passes on:
// it gets a private copy.
func serverWriter(w http.ResponseWriter) bool {
	_, own := serverConn(w)
	return own
}

// serverConn reports whether w, or a ResponseWriter it wraps (Unwrap, as
// http.ResponseController follows it), is an HTTP server's own: net/http's
// for HTTP/1 or HTTP/2, or golang.org/x/net/http2's. If it is, and its
// connection is one that handles slot memory only as the kernel or TLS
// does, ok is set, and own if w is that writer itself. HTTP/2 copies what
// it writes into its frames, and reads frames into buffers of its own;
// HTTP/1 writes a large body straight to the listener's connection and
// reads a body straight from it, which must then be plainConn: a user's
// listener may give connections of its own (a byte logger, a capture).
func serverConn(w http.ResponseWriter) (ok, own bool) {
	for own = true; ; own = false {
		v := reflect.ValueOf(w)
		if v.Kind() == reflect.Pointer && !v.IsNil() {
			switch t := v.Type(); {
			case pointerTo(t, "net/http", "response"):
				c := v.Elem().FieldByName("conn")
				if c.Kind() != reflect.Pointer || c.IsNil() {
					return false, false
				}
				rwc := c.Elem().FieldByName("rwc")
				if rwc.Kind() != reflect.Interface || rwc.IsNil() || !plainConnTypes[rwc.Elem().Type()] {
					return false, false
				}
				return true, own
			case pointerTo(t, "net/http", "http2responseWriter"), pointerTo(t, "golang.org/x/net/http2", "responseWriter"):
				return true, own
			}
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return false, false
		}
		w = u.Unwrap()
	}
}

// plainConnTypes are the connections that handle what they are given as
// the kernel does, or as TLS does, which copies it into records of its own
// (see plainConn).
var plainConnTypes = map[reflect.Type]bool{
	reflect.TypeFor[*net.TCPConn]():  true,
	reflect.TypeFor[*net.UnixConn](): true,
	reflect.TypeFor[*tls.Conn]():     true,
}

// plainConn reports whether a hijacked connection is the server's own, a
// socket or TLS over one, which copies what it writes; a middleware's
// conn gets a private copy of a slot's bytes, as a middleware's
// ResponseWriter does (see serverWriter).
func plainConn(c net.Conn) bool { return plainConnTypes[reflect.TypeOf(c)] }

// startBody starts sending r's body on stream s. rc is r's
// ResponseController, used to interrupt a blocked read of the body;
// stalled, if not nil, is called when it cannot (see halt).
func startBody(c *child, s *stream, r *http.Request, w http.ResponseWriter, rc *http.ResponseController, stalled func()) *bodySender {
	b := &bodySender{c: c, s: s, r: r, rc: rc, stalled: stalled, stop: make(chan struct{}), done: make(chan struct{})}
	b.maxBytes = r.ProtoMajor == 1 && isMaxBytesReader(r.Body)
	b.expect = r.ProtoMajor == 1 && headerHasToken(r.Header["Expect"], "100-continue")
	b.expectPending = b.expect
	var left int64
	b.slots, left = serverBody(r.Body)
	if b.slots {
		b.slots, _ = serverConn(w)
	}
	b.limited = b.slots && left >= 0
	go b.pumpRequestBody()
	return b
}

// halt stops the sender and returns once it has stopped. It may be called
// more than once, and on a nil *bodySender (no body), where it does
// nothing.
//
// A read of r.Body under way, which may wait for a client that sends the
// rest of its body slowly or never, is interrupted by a read deadline in
// the past. net/http then takes the connection for dead: it cancels the
// connection's context, which the next request on it would inherit. So,
// on HTTP/1, the deadline stays: net/http's own read of what is left of
// the body, as it writes the response, fails too, and it closes the
// connection after the response instead of reading another request from
// it. (With full duplex net/http does not read there, but at the body's
// close after the handler: there a failed read would leave the rest of
// the body on the connection, to be read as the next request, so the
// deadline is lifted, and net/http reads the rest, as in-process.)
//
// Behind a ResponseWriter that hides net/http's (one without Unwrap) the
// read cannot be interrupted. halt then waits for it, as ServeHTTP may
// not return while it reads r.Body, until the client sends more or goes,
// as net/http would wait for that client in-process, after the handler
// returns, to discard what is left of the body. But first it calls
// stalled, if set, which gives the request's MaxInFlight place back: the
// module has answered, and the wait is the client's.
func (b *bodySender) halt() {
	if b == nil {
		return
	}
	b.once.Do(func() {
		b.stopOnce.Do(func() { close(b.stop) })
		if !b.reading.Load() {
			<-b.done
			return
		}
		if err := b.rc.SetReadDeadline(time.Now()); err != nil {
			if b.stalled != nil {
				b.stalled()
			}
			<-b.done
			return
		}
		<-b.done
		if b.r.ProtoMajor != 1 || b.fullDuplex || !b.s.bodyTouched.Load() {
			// (Without a read begun, nothing failed, and the request
			// may go to the next child, whose pump must read.)
			b.rc.SetReadDeadline(time.Time{})
		}
	})
}

// beforeHead is called, with the header locked (see lockHeader), before
// the final head of an HTTP/1 response that is not full duplex goes to w,
// unless net/http will close the connection after it anyway. net/http, as
// it writes that head, reads what is left of the request body, up to 256
// KiB, to discard it, as it would for the handler in-process; the pump must
// not read then, or the two reads share the body's bytes, and the module's
// body misses some and yet ends as if whole. So, unless the body is all
// sent, the pump stops, as net/http's discard stops the body in-process
// (the child has closed the module's body already: see
// responseWriter.keepsBody). But where net/http would leave the body to
// the handler in-process and close the connection after the response, the
// head says KeepBody: then beforeHead reports true, the caller sets
// "Connection: close", which keeps net/http from the body, and the pump
// reads on. (Full duplex would too, but net/http does not support it
// here: it would read the rest at the handler's end, and then again for
// the next request.)
func (b *bodySender) beforeHead(keep bool) (closeConn bool) {
	if keep {
		return true
	}
	select {
	case <-b.done:
	default:
		b.close()
	}
	return false
}

// maxPostHandlerReadBytes is net/http's: the most of a request body that
// it discards as it writes the response's head.
const maxPostHandlerReadBytes = 256 << 10

// close stops the sender without waiting for it: a read under way goes
// on, for net/http's discard may need what it reads (and an interrupted
// read would cancel the request's context), but what it reads is dropped,
// and the pump then ends the module's body, if it had not, with
// http.ErrBodyReadAfterClose (see beforeHead). halt still waits for it.
func (b *bodySender) close() {
	b.closing.Store(true)
	b.stopOnce.Do(func() { close(b.stop) })
}

// readBody reads r.Body into p, holding hdrMu while the read may write to
// w: every read of an http.MaxBytesReader, and the reads of an Expect:
// 100-continue body until one returns bytes or an error (the "100
// Continue" went before them).
func (b *bodySender) readBody(p []byte) (int, error) {
	r := b.r
	if !b.maxBytes && !b.expectPending {
		return r.Body.Read(p)
	}
	b.hdrMu.Lock()
	locked := true
	defer func() {
		if locked {
			b.hdrMu.Unlock()
		}
	}()
	if b.expectPending {
		b.continued.Store(true)
		if r.ContentLength > 0 && isExpectContinueReader(r.Body) {
			// net/http's own body of known length: an empty read
			// writes the "100 Continue" and returns without waiting
			// for the client, which would hold back the heads
			// meanwhile.
			r.Body.Read(p[:0])
			b.expectPending = false
			if !b.maxBytes {
				b.hdrMu.Unlock()
				locked = false
			}
		}
	}
	m, err := r.Body.Read(p)
	if m > 0 || err != nil {
		b.expectPending = false
	}
	return m, err
}

// pumpRequestBody reads r's body and sends it to the child in data frames,
// each within the credit the child granted, then its end (with trailers,
// or saying how reading failed). It returns when the body is sent, the
// sender is halted, or the child is gone.
func (b *bodySender) pumpRequestBody() {
	c, s, r := b.c, b.s, b.r
	ended := false // the body's end is sent
	defer func() {
		if !ended && b.closing.Load() {
			c.send(outFrame{kind: kindEnd, flags: flagBodyError, id: s.id, data: []byte{bodyErrClosed}}, r.Context().Done())
		}
		close(b.done)
	}()
	var sent int64 // body bytes read so far
	peeked := false
	for {
		// Once the declared body is all sent, a read of one byte, with
		// no credit, looks for its end: the end costs no credit, so it
		// goes without waiting for the child to return any (a body of
		// one window would otherwise wait a round trip for it). A body
		// that goes on past r.ContentLength (a middleware's, that
		// decompresses, say) is read on to its EOF, as the module would
		// read it in-process; that byte waits for credit.
		peek := !peeked && r.ContentLength > 0 && sent == r.ContentLength && len(r.Trailer) == 0
		var credit, n int
		if peek {
			peeked, n = true, 1
		} else {
			var err error
			if credit, err = s.win.take(frameCost(1), frameCost(chunkSize), b.stop); err != nil {
				return
			}
			n = credit - frameOverhead
		}
		b.reading.Store(true)
		select {
		case <-b.stop:
			b.reading.Store(false)
			s.win.add(credit)
			return
		default:
		}
		size := n
		if left := r.ContentLength - sent; left > 0 && left < int64(size) {
			size = int(left) // a hint: a body that is longer is read on
		}
		// A read that may fill a slot reads into one, unless the
		// client's last read showed it sends slowly or the body's reader
		// is not the server's (see serverBody): the bytes then go to the
		// child where they are, with no copy on the way.
		var out chunk
		room := n // the most that a read into a slot may ask for
		if b.limited {
			_, left := serverBody(r.Body)
			room = int(min(int64(n), left))
		}
		if size >= ringMin && room >= ringMin && b.slots && !b.slow {
			out, _ = c.conn.takeReadSlot()
		}
		if out.ring == nil {
			out.buf = getBuffer(size)
		}
		space := out.space()
		if out.ring != nil {
			space = space[:min(len(space), room)]
		}
		if len(space) < n {
			s.win.add(n - len(space))
			credit -= n - len(space)
			n = len(space)
		}
		s.bodyTouched.Store(true)
		m, rerr := b.readBody(space[:n])
		if out.ring != nil {
			c.conn.readSlotDone()
		}
		// (A body's first read returns what net/http had read ahead
		// with the head, which says nothing of the client.)
		b.slow = sent > 0 && !peek && m < ringMin && m < n && rerr == nil
		sent += int64(m)
		if m > 0 {
			b.reads.Add(1)
		}
		b.reading.Store(false)
		select {
		case <-b.stop:
			// Halted during the read (see halt): nothing more is sent,
			// and the request may be over.
			out.release()
			return
		default:
		}
		if peek && m > 0 {
			var err error
			if credit, err = s.win.take(frameCost(m), frameCost(m), b.stop); err != nil {
				out.release()
				return
			}
		}
		switch {
		case m == 0:
			if credit > 0 {
				s.win.add(credit) // no frame is sent
			}
		case m < n:
			s.win.add(n - m)
		}
		var batch [2]outFrame
		fs := batch[:0]
		if m > 0 {
			fs = append(fs, outFrame{kind: kindData, id: s.id, data: space[:m], out: out})
		} else {
			out.release()
		}
		if rerr == io.EOF {
			// net/http's bodies report the end with the last bytes: both
			// go in one write.
			end := outFrame{kind: kindEnd, id: s.id}
			switch {
			case len(r.Trailer) == 0:
			case headerSize(r.Trailer) > maxHeadSize:
				// Too large for a message: the module sees the body fail.
				end.flags, end.data = flagBodyError, []byte{bodyErrOther}
			default:
				end.msg = &bodyEnd{Trailer: r.Trailer}
			}
			fs = append(fs, end)
		}
		if len(fs) > 0 && c.sendFrames(fs, b.stop) != nil {
			return
		}
		switch {
		case rerr == io.EOF:
			ended, b.whole = true, true
			return
		case rerr != nil:
			select {
			case <-b.stop:
				// The response is complete; the body is not needed.
			default:
				// The handler's read fails as it would in-process: with
				// the *http.MaxBytesError of a MaxBytesReader in front of
				// the Handle, or saying that the client went away.
				var p [maxBodyErrorLen]byte
				ended = c.send(outFrame{kind: kindEnd, flags: flagBodyError, id: s.id, data: appendBodyError(p[:0], rerr, r.Context().Err())}, b.stop) == nil
			}
			return
		}
	}
}
