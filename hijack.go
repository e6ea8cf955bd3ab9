package subproc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// This file holds the child's side of a hijacked connection (see
// PROTOCOL.md, "Upgrades"): the net.Conn that a handler gets from Hijack,
// whose bytes travel to and from the client's connection as the data frames
// of its stream, under the stream's windows.

// errConnReset is what a hijacked conn's Read and Write return once the
// client's connection has failed, or the parent ended the tunnel.
var errConnReset = errors.New("subproc: the client's connection was reset or closed by the parent")

// A hijackedConn is the net.Conn that Hijack returns in the child. Read,
// Write, Close and CloseWrite may be called concurrently, as on a TCP
// connection.
type hijackedConn struct {
	c             *conn       // fixed
	id            uint64      // fixed
	win           *sendWindow // fixed; the credit for the conn's writes (the response's)
	in            *bodyReader // fixed; what the client sends
	local, remote net.Addr    // fixed
	release       func()      // fixed; forgets the stream in the child

	rdl, wdl  connDeadline // read and write deadlines; closed for good by Close
	closeOnce sync.Once

	wmu     sync.Mutex // one Write at a time, so that bytes keep their order; guards wclosed
	wclosed bool       // CloseWrite or Close was called, or the tunnel failed
}

// newHijackedConn returns the conn of stream id, registered with the
// server by the caller, with release to unregister it.
func newHijackedConn(s *server, id uint64, win *sendWindow, req *http.Request, release func()) *hijackedConn {
	hc := &hijackedConn{c: s.conn, id: id, win: win, release: release}
	hc.in = newBodyReader(func(n int) { s.sendWindowUpdate(id, n, hc.rdl.closed) }, false, &s.flow)
	hc.remote = parseAddr("tcp", req.RemoteAddr)
	hc.local, _ = req.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if hc.local == nil {
		hc.local = netAddr{network: "tcp"} // the parent's ResponseWriter had no connection
	}
	return hc
}

// Read reads what the client sent, waiting for it. It returns io.EOF once
// the client has closed its side, os.ErrDeadlineExceeded after the read
// deadline, net.ErrClosed after Close.
func (hc *hijackedConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if hc.rdl.passed() {
		// As a TCP conn's read fails once its deadline has passed, even
		// with bytes waiting.
		return 0, hc.opError("read", os.ErrDeadlineExceeded)
	}
	n, err := hc.in.read(p, hc.rdl.wait())
	switch {
	case err == errCanceled || err == http.ErrBodyReadAfterClose:
		return n, hc.opError("read", hc.rdl.cause())
	case err != nil && err != io.EOF:
		return n, hc.opError("read", err)
	}
	return n, err
}

// Write sends p to the client, waiting for credit; it fails after the
// write deadline, CloseWrite or Close, or once the client's connection is
// gone.
func (hc *hijackedConn) Write(p []byte) (int, error) {
	hc.wmu.Lock()
	defer hc.wmu.Unlock()
	if hc.wclosed {
		if err := hc.wdl.cause(); err == net.ErrClosed {
			return 0, hc.opError("write", err)
		}
		return 0, hc.opError("write", errors.New("write after CloseWrite"))
	}
	n := 0
	for n < len(p) {
		if hc.wdl.passed() {
			// As a TCP conn's write fails once its deadline has
			// passed, not only one that must wait.
			return n, hc.opError("write", os.ErrDeadlineExceeded)
		}
		cancel := hc.wdl.wait()
		credit, err := hc.win.take(frameCost(1), frameCost(min(len(p)-n, chunkSize)), cancel)
		if err == errCanceled {
			return n, hc.opError("write", hc.wdl.cause())
		}
		if err != nil {
			if err != net.ErrClosed { // Close's, as a TCP conn's write fails after Close
				err = errConnReset
			}
			return n, hc.opError("write", err)
		}
		k := credit - frameOverhead
		if err := hc.c.send(outFrame{kind: kindData, id: hc.id, data: p[n : n+k]}, nil); err != nil {
			return n, hc.opError("write", err)
		}
		n += k
	}
	return n, nil
}

// CloseWrite ends what the conn sends: the client's connection is
// half-closed, and the client reads EOF. Reading goes on.
func (hc *hijackedConn) CloseWrite() error {
	hc.wmu.Lock()
	defer hc.wmu.Unlock()
	if hc.wclosed {
		return nil
	}
	hc.wclosed = true
	return hc.c.send(outFrame{kind: kindEnd, id: hc.id}, nil)
}

// Close closes the conn: the client's connection is closed once what was
// written before is delivered; blocked and later reads and writes fail with
// net.ErrClosed.
func (hc *hijackedConn) Close() error {
	err := hc.opError("close", net.ErrClosed)
	hc.closeOnce.Do(func() {
		err = nil
		hc.end(net.ErrClosed)
	})
	return err
}

// reset ends the conn because the parent ended the tunnel (kindCancel):
// reads and writes fail with errConnReset.
func (hc *hijackedConn) reset() {
	hc.closeOnce.Do(func() { hc.end(errConnReset) })
}

// end closes the conn with cause and tells the parent.
func (hc *hijackedConn) end(cause error) {
	hc.rdl.close(cause)
	hc.wdl.close(cause)
	hc.win.close(cause)
	hc.wmu.Lock()
	hc.wclosed = true
	hc.c.send(outFrame{kind: kindAbort, id: hc.id}, nil)
	hc.wmu.Unlock()
	hc.in.Close()
	hc.release()
}

// LocalAddr returns the local address of the client's connection in the
// parent (the parent's server's address), as net/http's conn would; an
// empty address if the parent's ResponseWriter had none.
func (hc *hijackedConn) LocalAddr() net.Addr { return hc.local }

// RemoteAddr returns the client's address, as the parent's server saw it
// (the request's RemoteAddr).
func (hc *hijackedConn) RemoteAddr() net.Addr { return hc.remote }

// SetDeadline sets both deadlines.
func (hc *hijackedConn) SetDeadline(t time.Time) error {
	if err := hc.SetReadDeadline(t); err != nil {
		return err
	}
	return hc.SetWriteDeadline(t)
}

// SetReadDeadline makes pending and later reads fail with
// os.ErrDeadlineExceeded from t on; the zero time means none.
func (hc *hijackedConn) SetReadDeadline(t time.Time) error {
	if !hc.rdl.set(t) {
		return hc.opError("set", net.ErrClosed)
	}
	return nil
}

// SetWriteDeadline makes pending and later writes fail with
// os.ErrDeadlineExceeded from t on; the zero time means none.
func (hc *hijackedConn) SetWriteDeadline(t time.Time) error {
	if !hc.wdl.set(t) {
		return hc.opError("set", net.ErrClosed)
	}
	return nil
}

func (hc *hijackedConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: hc.local, Addr: hc.remote, Err: err}
}

var _ net.Conn = (*hijackedConn)(nil)

// A tunnelConn is what Hijack gives the handler: its hold on a
// hijackedConn, which the server's table of streams holds too. A
// tunnelConn that becomes unreachable without being closed (its handler
// panicked, or returned and forgot it) closes its conn once the garbage
// collector finds it so, as net/http's connection is closed when its
// file descriptor is collected: else the client's connection, and what
// the parent holds for it, would stay open for as long as the child
// lives. Each method keeps the tunnelConn reachable while it runs.
type tunnelConn struct{ hc *hijackedConn }

// newTunnelConn returns the handler's hold on hc.
func newTunnelConn(hc *hijackedConn) *tunnelConn {
	tc := &tunnelConn{hc}
	runtime.AddCleanup(tc, func(hc *hijackedConn) { hc.Close() }, hc)
	return tc
}

func (tc *tunnelConn) Read(p []byte) (int, error) {
	defer runtime.KeepAlive(tc)
	return tc.hc.Read(p)
}

func (tc *tunnelConn) Write(p []byte) (int, error) {
	defer runtime.KeepAlive(tc)
	return tc.hc.Write(p)
}

// CloseWrite is hijackedConn.CloseWrite, as a *net.TCPConn has one.
func (tc *tunnelConn) CloseWrite() error {
	defer runtime.KeepAlive(tc)
	return tc.hc.CloseWrite()
}

func (tc *tunnelConn) Close() error                       { return tc.hc.Close() }
func (tc *tunnelConn) LocalAddr() net.Addr                { return tc.hc.LocalAddr() }
func (tc *tunnelConn) RemoteAddr() net.Addr               { return tc.hc.RemoteAddr() }
func (tc *tunnelConn) SetDeadline(t time.Time) error      { return tc.hc.SetDeadline(t) }
func (tc *tunnelConn) SetReadDeadline(t time.Time) error  { return tc.hc.SetReadDeadline(t) }
func (tc *tunnelConn) SetWriteDeadline(t time.Time) error { return tc.hc.SetWriteDeadline(t) }

// A connDeadline is one deadline of a hijackedConn, or of a request's
// ResponseController: a channel closed when it passes or the conn closes,
// replaced when it is moved after it passed. Its zero value has no
// deadline; the channels are made when first needed, as most requests
// never wait on them.
type connDeadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	ch     chan struct{} // closed when the deadline passes; nil until needed
	closed chan struct{} // closed by close; nil until then
	err    error         // the cause close was given
}

// chLocked returns d.ch, made if need be.
func (d *connDeadline) chLocked() chan struct{} {
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

// set moves the deadline to t; the zero time means none. It reports false
// if the conn is closed.
func (d *connDeadline) set(t time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return false
	}
	if d.timer != nil && !d.timer.Stop() {
		<-d.ch // the timer fired: wait for it to close ch
	}
	d.timer = nil
	select {
	case <-d.ch: // never ready while nil
		d.ch = nil
	default:
	}
	if t.IsZero() {
		return true
	}
	ch := d.chLocked()
	if dur := time.Until(t); dur > 0 {
		d.timer = time.AfterFunc(dur, func() { close(ch) })
	} else {
		close(ch)
	}
	return true
}

// wait returns a channel closed when the deadline passes or the conn is
// closed. A closed conn's channel is closed for good.
func (d *connDeadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return d.closed
	}
	return d.chLocked()
}

// passed reports whether the deadline has passed; false for none, or
// for a closed conn.
func (d *connDeadline) passed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil || d.ch == nil {
		return false
	}
	select {
	case <-d.ch:
		return true
	default:
		return false
	}
}

// cause says why a wait's channel was closed.
func (d *connDeadline) cause() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return d.err
	}
	return os.ErrDeadlineExceeded
}

// close ends the deadline for good, with err as the cause. It wakes the
// waits on the deadline's channel too.
func (d *connDeadline) close(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return
	}
	d.err = err
	d.closed = make(chan struct{})
	close(d.closed)
	if d.timer != nil && !d.timer.Stop() {
		<-d.ch
	}
	d.timer = nil
	if d.ch != nil {
		select {
		case <-d.ch:
		default:
			close(d.ch) // wakes the waits
		}
	}
}

// parseAddr returns the address addr of network: a *net.TCPAddr for an IP
// address and port, a *net.UnixAddr for a unix socket's, else an address
// that reads as addr.
func parseAddr(network, addr string) net.Addr {
	switch network {
	case "tcp", "tcp4", "tcp6":
		if ap, err := netip.ParseAddrPort(addr); err == nil {
			return net.TCPAddrFromAddrPort(ap)
		}
	case "unix", "unixpacket":
		return &net.UnixAddr{Name: addr, Net: network}
	}
	return netAddr{network, addr}
}

// parseLocalAddr returns the address that requestHead.LocalAddr carries:
// its network, a space, and the address.
func parseLocalAddr(s string) net.Addr {
	network, addr, _ := strings.Cut(s, " ")
	return parseAddr(network, addr)
}

// A netAddr is an address known only by its network and string.
type netAddr struct{ network, addr string }

func (a netAddr) Network() string { return a.network }
func (a netAddr) String() string  { return a.addr }

// appendRawHead appends the HTTP/1.1 response head that net/http writes
// for status and header when a handler hijacks after WriteHeader: the
// status line, the fields (with a Date if there is none), a blank line.
func appendRawHead(b []byte, status int, header http.Header) []byte {
	b = fmt.Appendf(b, "HTTP/1.1 %03d %s\r\n", status, http.StatusText(status))
	var buf bytes.Buffer
	header.Write(&buf)
	if header.Get("Date") == "" {
		fmt.Fprintf(&buf, "Date: %s\r\n", time.Now().UTC().Format(http.TimeFormat))
	}
	b = append(b, buf.Bytes()...)
	return append(b, "\r\n"...)
}

// Hijack lets the handler take over the connection, as net/http's does
// (see PROTOCOL.md, "Upgrades"): it returns a conn whose bytes go to and
// come from the client's connection, and a bufio.ReadWriter on it. If the
// handler called WriteHeader (a 101, say), that head is the conn's first
// bytes, as net/http writes it at Hijack. It fails with
// http.ErrNotSupported where net/http would not offer Hijack (an HTTP/2
// request) or the parent cannot hijack; and if the handler returned, or
// the request body is not all read. A response the handler had started
// (written or flushed) goes to the client first, all of it, flushed: the
// conn's bytes follow it. (net/http drops body bytes still buffered at
// Hijack; here none are lost.)
func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.hijack == nil:
		return nil, nil, fmt.Errorf("subproc: Hijack: the parent cannot hijack the client's connection (an HTTP/2 request, or a ResponseWriter that is not an http.Hijacker in front of the Handle): %w", http.ErrNotSupported)
	case w.hijacked():
		return nil, nil, http.ErrHijacked
	case w.done:
		return nil, nil, errAfterHandler
	}
	var prefix []byte
	switch {
	case w.headSent || w.out.n > 0:
		// The response has started: what the handler wrote goes to the
		// client first, flushed, and the conn's bytes follow it, as they
		// follow a flushed response in net/http.
		if err := w.sendBodyLocked(flagFlush, nil); err != nil {
			return nil, nil, err
		}
	case w.wroteHeader:
		prefix = appendRawHead(nil, w.status, w.sent)
	}
	hc, err := w.hijack()
	if err != nil {
		return nil, nil, err
	}
	w.conn.Store(hc)
	if len(prefix) > 0 {
		if _, err := hc.Write(prefix); err != nil {
			hc.Close()
			return nil, nil, err
		}
	}
	tc := newTunnelConn(hc)
	return tc, bufio.NewReadWriter(bufio.NewReader(tc), bufio.NewWriter(tc)), nil
}
