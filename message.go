package subproc

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// protocolVersion is written in the preamble of both directions. Bump it
// whenever a message or a frame kind changes meaning.
const protocolVersion = 13

// Frame kinds. PROTOCOL.md says which side may send which kind in each
// state of a stream. Every frame carries a request id; kinds marked "id 0" are not
// about a request. Payloads are messages, raw body bytes, or nothing, as
// noted. The heads (requestHead, responseHead), bodyEnd and ready encode
// themselves (see wire.go); hello, which only the parent sends, is
// gob-encoded.
//
// A stream is one request's exchange. The parent opens it with kindRequest;
// the child ends it with exactly one kindEnd or kindAbort, after which it
// sends nothing more for that id except kindWindow. The parent ends its side
// with kindEnd (request body complete) or kindCancel (the client went away).
// Before a request's handler runs, the child records the request in the
// accept word, outside the pipes: a request that a dead child did not record
// never reached the module, and the parent may give it to the next child.
const (
	kindHello    uint8 = iota + 1 // parent → child, id 0: hello
	kindReady                     // child → parent, id 0: ready
	kindRequest                   // parent → child: requestHead; opens the stream
	kindResponse                  // child → parent: responseHead; 1xx heads may precede the final one
	kindData                      // both: raw body bytes, counted against the window
	kindEnd                       // both: end of body; bodyEnd when there are trailers, else empty
	kindWindow                    // both: 4-byte big-endian window increment
	kindCancel                    // parent → child: the request is gone; cancel its context
	kindAbort                     // child → parent: the response cannot be completed; abort it
	kindPing                      // parent → child, id = sequence number
	kindPong                      // child → parent, id = the ping's sequence number
	kindStop                      // parent → child, id 0: cancel the requests left, end their handlers and exit
	kindDrain                     // parent → child, id 0: a drain began; cancel the ModuleFunc's context
	kindStacks                    // parent → child, id 0: write every goroutine's stack to the module's log
	kindHijack                    // child → parent: the handler hijacked the connection; the stream is a tunnel (see PROTOCOL.md)
	kindDataRef                   // child → parent: kindData whose bytes are in a bodyRing slot; 4-byte big-endian slot, 4-byte big-endian length
)

// Frame flags.
const (
	flagFlush     uint8 = 1 << 0 // kindData from the child: the handler flushed
	flagNoBody    uint8 = 1 << 1 // kindRequest: the request has no body; no kindData or kindEnd follows
	flagBodyError uint8 = 1 << 2 // kindEnd from the parent: reading the client's body failed; the payload says how (see appendBodyError)
	flagTooLarge  uint8 = 1 << 3 // kindAbort: the response's head or trailers exceed maxHeadSize
	flagDeadline  uint8 = 1 << 4 // kindCancel: the request's deadline passed
	flagMayRead   uint8 = 1 << 5 // kindCancel: the request's context ended, but its client may still read the response (see responseWriter.stay)

	// flagOverBudget marks a kindAbort that the parent made itself, in
	// place of a response head or trailers that its module's head budget
	// could not hold (see stream.chargeHeadLocked). It is never on the
	// wire: the parent clears it in what a child sends.
	flagOverBudget uint8 = 1 << 7
)

// Sizes of the flow control, in bytes.
const (
	// chunkSize is the largest payload of a kindData frame, and the size of
	// the pooled buffers that carry bodies.
	chunkSize = 64 << 10

	// initialWindow is the window every stream starts with, in each
	// direction: the credit a sender has before its receiver returns any.
	// It is one full chunk, so that a body of up to chunkSize goes in one
	// frame without waiting for a window update, and a stream whose
	// receiver never consumes holds no more than that (see flowBudget).
	// It is not taken from the budget: every stream always has it.
	initialWindow = chunkSize + frameOverhead

	// window is the most a stream's window grows to, in each direction:
	// the most body bytes of one stream that may be sent and not yet
	// consumed. A receiver doubles a stream's window, from initialWindow,
	// while the stream drains fast (see recvWindow), with growth reserved
	// from the module's flowBudget. One stream needs 512 KiB to 1 MiB of
	// window to stream at full speed over the pipes.
	window = 1 << 20

	// flowBudgetSize bounds the window growth of all the streams of a
	// module in one direction together: what the parent may buffer of all
	// its children's responses, and what a child may buffer of all its
	// request bodies, is at most flowBudgetSize + initialWindow × the
	// streams in flight. 16 fast streams can run at the full window at once.
	flowBudgetSize = 16 << 20

	// freeHeadCost is what a response head, or a message of trailers, may
	// cost decoded (see wireReader.charge) and be held by the parent
	// without a charge to the module's head budget: nearly every head.
	freeHeadCost = 64 << 10

	// headBudgetSize bounds what the larger heads and trailers that the
	// parent holds of all of a module's responses cost decoded, together,
	// from their arrival until their request's exchange ends: each is
	// reserved from the module's head budget, and one that does not fit
	// fails its response (see stream.chargeHeadLocked). With the heads
	// every stream may hold free, what the parent holds of a module's
	// heads is at most headBudgetSize + freeHeadCost × the streams in
	// flight, however slowly their clients read. Two of the largest
	// heads a frame carries fit.
	headBudgetSize = 16 << 20

	// frameOverhead is what a kindData frame costs against a window on top
	// of its bytes, so that a window bounds the number of queued frames (a
	// handler may flush tiny chunks) as well as their bytes.
	frameOverhead = 256

	// maxInformational bounds the 1xx responses of one request. The child
	// drops those beyond it; the parent treats more as a protocol error.
	maxInformational = 32

	// maxReadyErr bounds the ModuleFunc's error that ready carries.
	maxReadyErr = 64 << 10
)

// growPeriod sets how fast a stream must drain for its window to grow: a
// receiver doubles a stream's window when the stream consumed what it
// returns in less than growPeriod × (what it returns / the window), that is
// while the stream's rate times growPeriod exceeds its window, and nothing
// is waiting to be consumed (the sender, not the consumer, holds it back).
// It stands for the round trip of a window update through both processes
// on a loaded machine, which a window must cover to keep a stream moving.
const growPeriod = 2 * time.Millisecond

// frameCost is what a kindData frame carrying n bytes costs against a window.
func frameCost(n int) int { return n + frameOverhead }

// hello is the parent's first message to a new child.
type hello struct {
	Name        string
	Incarnation int
	Slot        int
	Config      []byte
	LogDir      string
}

// ready is the child's answer to hello: it is sent once the ModuleFunc has
// returned. Err is the ModuleFunc's error, if it failed, cut to
// maxReadyErr bytes. It encodes itself (see wire.go).
type ready struct {
	Pid int
	Err string
}

// requestHead carries an *http.Request without its body, with the URL
// flattened. It encodes itself (see wire.go).
type requestHead struct {
	Method     string
	Scheme     string
	Opaque     string
	User       string // url.Userinfo.String(), "" for none
	URLHost    string
	Path       string
	RawPath    string
	RawQuery   string
	Fragment   string
	ForceQuery bool
	OmitHost   bool

	Proto            string
	ProtoMajor       int
	ProtoMinor       int
	Header           http.Header
	Host             string
	ContentLength    int64
	TransferEncoding []string
	Close            bool
	Trailer          []string // declared trailer keys; values come with kindEnd
	RemoteAddr       string
	RequestURI       string
	TLS              *tlsState
	Deadline         int64  // when the request's context ends, in Unix nanoseconds; 0 for never
	Hijackable       bool   // the parent can hijack the client's connection: the module's Hijack may succeed
	LocalAddr        string // the client connection's local address in the parent (http.LocalAddrContextKey), as "network address"; sent with Hijackable

	// Pattern is the pattern the request matched in the parent, with
	// ServeMux or Route (r.Pattern), and PathValues its wildcards' values
	// there, as name, value pairs: the child's request gets both, so that
	// r.Pattern and r.PathValue read as they would in-process. Both are
	// empty for a request that matched no pattern, and then cost nothing
	// on the wire.
	Pattern    string
	PathValues []string

	// ResponseHeader is the parent's w.Header() as it was when ServeHTTP
	// was called: what a middleware in front of the Handle put there. The
	// handler's header map in the child starts as it, as the map a handler
	// in-process shares with the middleware that called it. Usually empty,
	// and then it costs nothing on the wire (see wire.go).
	ResponseHeader http.Header

	// Form and PostForm are r.Form and r.PostForm when a middleware in
	// front of the Handle parsed the form (r.ParseForm, r.FormValue,
	// r.PostFormValue), which consumed the body: the child's request gets
	// them, as the handler in-process would find them. nil when not
	// parsed, and then they cost nothing on the wire.
	Form, PostForm http.Header
}

// tlsState is the part of tls.ConnectionState that can cross a pipe.
type tlsState struct {
	Version            uint16
	CipherSuite        uint16
	ServerName         string
	NegotiatedProtocol string
	DidResume          bool
}

// responseHead carries a response's status and header. It encodes itself
// (see wire.go).
type responseHead struct {
	Status     int
	Header     http.Header
	Trailer    []string // declared trailer keys (the "Trailer" header, which is hop-by-hop)
	FullDuplex bool     // the handler called EnableFullDuplex
	// KeepBody: the request is HTTP/1 and the handler may read its body
	// on after this head, as net/http lets it when it closes the
	// connection after the response instead of discarding the body (see
	// responseWriter.keepsBody). False: the child has closed the body.
	KeepBody bool

	cost int32 // what the head cost decoded (see wireReader.charge); set by decodeWire, never sent
}

// bodyEnd carries trailers at the end of a body. It encodes itself (see
// wire.go).
type bodyEnd struct {
	Trailer http.Header

	cost int32 // what the trailers cost decoded (see wireReader.charge); set by decodeWire, never sent
}

// Kinds of request body failure. A kindEnd frame with flagBodyError
// carries, instead of a bodyEnd, one of these codes in one byte, followed
// for bodyErrTooLarge by the limit as an unsigned varint; nothing else.
const (
	bodyErrOther    = iota // anything else: the handler's read fails with io.ErrUnexpectedEOF
	bodyErrTooLarge        // a *http.MaxBytesError: the handler's read fails with one, of the same Limit
	bodyErrGone            // the client went away: the handler's read fails with errClientGone
	bodyErrClosed          // net/http took the rest (see exchange.writeHead): the handler's read fails with http.ErrBodyReadAfterClose
)

// maxBodyErrorLen bounds the payload of a kindEnd with flagBodyError.
const maxBodyErrorLen = 1 + binary.MaxVarintLen64

// appendBodyError appends to b the payload that tells the child why reading
// the client's body failed with err. ctxErr is the request context's
// error.
func appendBodyError(b []byte, err, ctxErr error) []byte {
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe) && mbe.Limit >= 0:
		return binary.AppendUvarint(append(b, bodyErrTooLarge), uint64(mbe.Limit))
	case errors.Is(ctxErr, context.Canceled) || errors.Is(err, syscall.ECONNRESET):
		return append(b, bodyErrGone)
	}
	return append(b, bodyErrOther)
}

// parseBodyError returns the error that the handler's body read must
// return for a payload that appendBodyError made, or ok false if p is
// malformed.
func parseBodyError(p []byte) (err error, ok bool) {
	if len(p) == 0 || len(p) > maxBodyErrorLen {
		return nil, false
	}
	switch p[0] {
	case bodyErrOther:
		return io.ErrUnexpectedEOF, len(p) == 1
	case bodyErrGone:
		return errClientGone, len(p) == 1
	case bodyErrClosed:
		return http.ErrBodyReadAfterClose, len(p) == 1
	case bodyErrTooLarge:
		limit, n := binary.Uvarint(p[1:])
		if n <= 0 || 1+n != len(p) || limit > math.MaxInt64 {
			return nil, false
		}
		return &http.MaxBytesError{Limit: int64(limit)}, true
	}
	return nil, false
}

// hopHeaders are the hop-by-hop headers that httputil.ReverseProxy removes
// in both directions.
var hopHeaders = []string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// hasHopByHop reports whether h has a hop-by-hop field: one of hopHeaders,
// Connection among them, which names any others.
func hasHopByHop(h http.Header) bool {
	for _, f := range hopHeaders {
		if _, ok := h[f]; ok {
			return true
		}
	}
	return false
}

// upgradeType returns the protocol a request asks to upgrade to: its
// Upgrade header if Connection lists "upgrade", else "".
func upgradeType(h http.Header) string {
	if !headerHasToken(h["Connection"], "upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// removeHopByHop removes hop-by-hop headers from h, as
// httputil.ReverseProxy does: those listed above, and those named by
// Connection.
func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = strings.TrimSpace(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
	for _, f := range hopHeaders {
		delete(h, f) // already canonical: h.Del would canonicalize again
	}
}

// adoptHeader makes dst, the parent's response header, the module's header
// map src as it was at one of the module's WriteHeader calls, the way
// net/http writes a handler's current map at each WriteHeader: fields that
// src lacks are deleted from dst, the others take src's values. src must
// have had its hop-by-hop fields removed (removeHopByHop). dst's own
// hop-by-hop fields stay as they are, but for Trailer (see proxy): they
// concern the parent's connection to the client, such as the "Connection:
// close" that http.MaxBytesReader sets, and the module can neither see the
// ones set after ServeHTTP began nor change any (its own are removed, as
// httputil.ReverseProxy removes them).
//
// src's values are taken, not copied: the caller must not use src after.
func adoptHeader(dst, src http.Header) {
	conn := dst["Connection"]
	for k := range dst {
		if _, ok := src[k]; !ok && !isParentHop(k, conn) {
			delete(dst, k)
		}
	}
	for k, v := range src {
		dst[k] = v
	}
}

// isParentHop reports whether the parent's response header field k is
// hop-by-hop, given the parent's Connection values: adoptHeader keeps
// those.
func isParentHop(k string, conn []string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Transfer-Encoding", "Upgrade":
		return true
	}
	return len(conn) > 0 && headerHasToken(conn, k)
}

// headerHasToken reports whether a comma-separated header value lists token.
func headerHasToken(values []string, token string) bool {
	for _, v := range values {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// newRequestHead describes r for the child. Its header is the request's
// without the hop-by-hop fields: r.Header itself where it has none, which
// the head then only reads, else a copy; "Te: trailers" survives, as it
// does through httputil.ReverseProxy.
func newRequestHead(r *http.Request) *requestHead {
	h := &requestHead{
		Method:           r.Method,
		Proto:            r.Proto,
		ProtoMajor:       r.ProtoMajor,
		ProtoMinor:       r.ProtoMinor,
		Header:           r.Header,
		Host:             r.Host,
		ContentLength:    r.ContentLength,
		TransferEncoding: r.TransferEncoding,
		Close:            r.Close,
		RemoteAddr:       r.RemoteAddr,
		RequestURI:       r.RequestURI,
	}
	if h.Header == nil {
		h.Header = http.Header{}
	}
	if u := r.URL; u != nil {
		h.Scheme, h.Opaque, h.URLHost = u.Scheme, u.Opaque, u.Host
		h.Path, h.RawPath, h.RawQuery, h.Fragment = u.Path, u.RawPath, u.RawQuery, u.Fragment
		h.ForceQuery, h.OmitHost = u.ForceQuery, u.OmitHost
		if u.User != nil {
			h.User = u.User.String()
		}
	}
	if hasHopByHop(r.Header) {
		h.Header = r.Header.Clone()
		removeHopByHop(h.Header)
		if headerHasToken(r.Header["Te"], "trailers") {
			h.Header.Set("Te", "trailers")
		}
		if upgrade := upgradeType(r.Header); upgrade != "" {
			// As httputil.ReverseProxy forwards an upgrade: the
			// module decides whether to switch protocols.
			h.Header.Set("Connection", "Upgrade")
			h.Header.Set("Upgrade", upgrade)
		}
	}
	for k := range r.Trailer {
		h.Trailer = append(h.Trailer, k)
	}
	h.Pattern, h.PathValues = pathValues(r)
	if r.Form != nil {
		h.Form = http.Header(r.Form)
	}
	if r.PostForm != nil {
		h.PostForm = http.Header(r.PostForm)
	}
	if s := r.TLS; s != nil {
		h.TLS = &tlsState{
			Version:            s.Version,
			CipherSuite:        s.CipherSuite,
			ServerName:         s.ServerName,
			NegotiatedProtocol: s.NegotiatedProtocol,
			DidResume:          s.DidResume,
		}
	}
	return h
}

// request rebuilds the http.Request that h describes, with its URL in u.
// The caller sets its body and context.
func (h *requestHead) request(u *url.URL) (http.Request, error) {
	*u = url.URL{
		Scheme:     h.Scheme,
		Opaque:     h.Opaque,
		Host:       h.URLHost,
		Path:       h.Path,
		RawPath:    h.RawPath,
		RawQuery:   h.RawQuery,
		Fragment:   h.Fragment,
		ForceQuery: h.ForceQuery,
		OmitHost:   h.OmitHost,
	}
	if h.User != "" {
		pu, err := url.Parse("//" + h.User + "@x")
		if err != nil || pu.User == nil {
			return http.Request{}, fmt.Errorf("bad user info in request URL")
		}
		u.User = pu.User
	}
	if h.Header == nil {
		h.Header = http.Header{}
	}
	r := http.Request{
		Method:           h.Method,
		URL:              u,
		Proto:            h.Proto,
		ProtoMajor:       h.ProtoMajor,
		ProtoMinor:       h.ProtoMinor,
		Header:           h.Header,
		Host:             h.Host,
		ContentLength:    h.ContentLength,
		TransferEncoding: h.TransferEncoding,
		Close:            h.Close,
		RemoteAddr:       h.RemoteAddr,
		RequestURI:       h.RequestURI,
	}
	if h.Form != nil {
		r.Form = url.Values(h.Form)
	}
	if h.PostForm != nil {
		r.PostForm = url.Values(h.PostForm)
	}
	if len(h.Trailer) > 0 {
		r.Trailer = make(http.Header, len(h.Trailer))
		for _, k := range h.Trailer {
			r.Trailer[k] = nil
		}
	}
	if s := h.TLS; s != nil {
		r.TLS = &tls.ConnectionState{
			Version:            s.Version,
			HandshakeComplete:  true,
			DidResume:          s.DidResume,
			CipherSuite:        s.CipherSuite,
			ServerName:         s.ServerName,
			NegotiatedProtocol: s.NegotiatedProtocol,
		}
	}
	return r, nil
}

// declaredTrailers returns the keys announced by a "Trailer" header.
func declaredTrailers(h http.Header) []string {
	var keys []string
	for _, v := range h["Trailer"] {
		for k := range strings.SplitSeq(v, ",") {
			if k = http.CanonicalHeaderKey(strings.TrimSpace(k)); k != "" {
				keys = append(keys, k)
			}
		}
	}
	return keys
}

// An encoder gob-encodes messages into frame payloads. One gob stream spans
// all the frames of a connection, so a type is described only the first time
// it is sent. It is owned by the writing goroutine.
type encoder struct {
	buf bytes.Buffer
	enc *gob.Encoder
}

func newEncoder() *encoder {
	e := new(encoder)
	e.enc = gob.NewEncoder(&e.buf)
	return e
}

// A wireMessage encodes itself, and its encoding is the whole payload of
// its frame: gob never sees it. The heads are (see wire.go).
type wireMessage interface {
	appendWire(b []byte) []byte
	decodeWire(p []byte) error
}

// appendPayload appends the payload for v to b: a wireMessage's own
// encoding, straight into b, or gob's, through the encoder's buffer.
func (e *encoder) appendPayload(b []byte, v any) ([]byte, error) {
	if m, ok := v.(wireMessage); ok {
		return m.appendWire(b), nil
	}
	if e.buf.Cap() > maxKeptBuffer {
		e.buf = bytes.Buffer{} // after a message of megabytes: not kept for good
	}
	e.buf.Reset()
	if err := e.enc.Encode(v); err != nil {
		return b, err
	}
	return append(b, e.buf.Bytes()...), nil
}

// encode returns the payload for v, in a new slice.
func (e *encoder) encode(v any) ([]byte, error) { return e.appendPayload(nil, v) }

// maxKeptBuffer bounds the buffer an encoder keeps from one message to the
// next.
const maxKeptBuffer = 64 << 10

// A decoder decodes the messages that an encoder wrote, one frame payload at
// a time. It is owned by the reading goroutine.
type decoder struct {
	src payloadReader
	dec *gob.Decoder
}

func newDecoder() *decoder {
	d := new(decoder)
	d.dec = gob.NewDecoder(&d.src)
	return d
}

// errGobFraming reports a payload whose gob message lengths do not add up.
var errGobFraming = errors.New("gob message lengths do not match the frame")

// decode decodes payload p into v, which must point to a zero value. A
// wireMessage decodes itself. Otherwise the payload must hold exactly the
// gob messages for one value: the lengths are checked before gob sees
// them, so a corrupt length never makes gob allocate more than the frame's
// size. Only a child decodes gob, and only what its parent sent (hello):
// the parent's messages carry no map, whose claimed size gob would allocate
// before reading an entry (TestGobMessagesHaveNoMaps checks).
func (d *decoder) decode(p []byte, v any) error {
	if m, ok := v.(wireMessage); ok {
		return m.decodeWire(p)
	}
	if err := checkGobFraming(p); err != nil {
		return err
	}
	d.src.p = p
	err := d.dec.Decode(v)
	rest := len(d.src.p)
	d.src.p = nil
	if err != nil {
		return err
	}
	if rest != 0 {
		return fmt.Errorf("%d bytes left over after a message", rest)
	}
	return nil
}

// checkGobFraming checks that p is a sequence of gob messages, each an
// unsigned length followed by that many bytes.
func checkGobFraming(p []byte) error {
	if len(p) == 0 {
		return errGobFraming
	}
	for len(p) > 0 {
		n, w := gobUint(p)
		if w == 0 || n > uint64(len(p)-w) {
			return errGobFraming
		}
		p = p[w+int(n):]
	}
	return nil
}

// gobUint decodes an unsigned integer in gob's encoding: one byte below
// 0x80, or a negated byte count followed by that many big-endian bytes. It
// returns the bytes used, 0 if p is too short or malformed.
func gobUint(p []byte) (uint64, int) {
	if len(p) == 0 {
		return 0, 0
	}
	b := p[0]
	if b < 0x80 {
		return uint64(b), 1
	}
	n := -int(int8(b))
	if n > 8 || n > len(p)-1 {
		return 0, 0
	}
	var x uint64
	for _, c := range p[1 : 1+n] {
		x = x<<8 | uint64(c)
	}
	return x, 1 + n
}

// payloadReader serves one frame payload to a gob.Decoder. It implements
// io.ByteReader so that the decoder reads from it directly, never past the
// payload.
type payloadReader struct {
	p []byte
}

func (r *payloadReader) Read(b []byte) (int, error) {
	if len(r.p) == 0 {
		return 0, errShortPayload
	}
	n := copy(b, r.p)
	r.p = r.p[n:]
	return n, nil
}

func (r *payloadReader) ReadByte() (byte, error) {
	if len(r.p) == 0 {
		return 0, errShortPayload
	}
	b := r.p[0]
	r.p = r.p[1:]
	return b, nil
}

var errShortPayload = errors.New("message ends before its frame")
