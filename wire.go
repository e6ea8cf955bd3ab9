package subproc

import (
	"encoding/binary"
	"errors"
	"net/http"

	"github.com/fbbf71ac/subproc/internal/frame"
)

// The request and response heads are the messages of every request, so
// they encode themselves (wireMessage), in a compact binary form that is
// the whole payload of their frames, instead of going through gob, whose
// reflection and per-message type and length prefixes cost more than the
// encoding itself: varints, and strings and lists prefixed with their
// length. Decoding copies the payload into one string and slices every
// header key and value out of it, so that a head costs a handful of
// allocations whatever its size; every count is checked against the bytes
// left before anything is allocated for it.
//
// Every message the parent reads from a child encodes itself too (the
// heads, the trailers of bodyEnd, ready): the parent never hands a child's
// bytes to gob, which keeps every type a stream ever described for the
// stream's life and is not made for hostile input. What a decoded message
// costs in memory is bounded as its encoding is: each string in a list, each
// list and each header key is charged what decoding it allocates (itemCost,
// listCost, keyCost) on top of its bytes, and a message charged more than
// maxHeadSize is refused. A one-byte empty header value costs 16 bytes
// decoded; without the charge a head of 8 MiB on the wire could take 128
// MiB. Senders check the same sum (stringsSize, headerSize), so a message
// that a sender accepts is never refused by its receiver.

// wireVersion opens a head's encoding; a head that does not start with it
// is rejected.
const wireVersion = 1

// errBadHead reports a message (a head, trailers, ready) whose encoding is
// malformed.
var errBadHead = errors.New("malformed encoding")

// A wireWriter appends a message's encoding to a buffer.
type wireWriter struct{ b []byte }

// newWireWriter returns a writer that appends to b a message's encoding,
// which it opens with wireVersion.
func newWireWriter(b []byte) wireWriter {
	w := wireWriter{b: b}
	w.uint(wireVersion)
	return w
}

func (w *wireWriter) uint(v uint64) { w.b = binary.AppendUvarint(w.b, v) }
func (w *wireWriter) int(v int64)   { w.b = binary.AppendVarint(w.b, v) }

func (w *wireWriter) string(s string) {
	w.uint(uint64(len(s)))
	w.b = append(w.b, s...)
}

func (w *wireWriter) strings(ss []string) {
	w.uint(uint64(len(ss)))
	for _, s := range ss {
		w.string(s)
	}
}

func (w *wireWriter) header(h http.Header) {
	w.uint(uint64(len(h)))
	for k, vs := range h {
		w.string(k)
		w.strings(vs)
	}
}

// What decoding allocates for a string in a list (its string header), a
// list (a slice header) and a header key (its map entry, with the key's
// string header and its values' slice header), besides their bytes. Each
// is at least the most a varint takes, so that the sums that use them bound
// the encoding as well.
const (
	itemCost = 16
	listCost = 24
	keyCost  = 48
)

// errHeadTooLarge reports a message that would cost more than maxHeadSize
// once decoded.
var errHeadTooLarge = errors.New("head or trailers exceed the size limit once decoded")

// A wireReader decodes a head. After the first error every read returns a
// zero value, and err holds the error.
type wireReader struct {
	s    string // the payload, copied once
	off  int
	cost int // what the lists and headers decoded so far cost (see itemCost)
	err  error
}

// newWireReader returns a reader of the message encoded in p, which must
// open with wireVersion (else every read fails).
func newWireReader(p []byte) *wireReader {
	r := &wireReader{s: string(p)}
	if r.uint() != wireVersion {
		r.fail()
	}
	return r
}

func (r *wireReader) fail() { r.failWith(errBadHead) }

func (r *wireReader) failWith(err error) {
	if r.err == nil {
		r.err = err
	}
}

// charge adds n to what the message costs decoded, and fails once that
// exceeds maxHeadSize.
func (r *wireReader) charge(n int) {
	if r.cost += n; r.cost > maxHeadSize {
		r.failWith(errHeadTooLarge)
	}
}

func (r *wireReader) uint() uint64 {
	if r.err != nil {
		return 0
	}
	var v uint64
	var shift uint
	for i := 0; ; i++ {
		if r.off >= len(r.s) || i == binary.MaxVarintLen64 {
			r.fail()
			return 0
		}
		b := r.s[r.off]
		r.off++
		if b < 0x80 {
			return v | uint64(b)<<shift
		}
		v |= uint64(b&0x7f) << shift
		shift += 7
	}
}

func (r *wireReader) int() int64 {
	u := r.uint()
	v := int64(u >> 1)
	if u&1 != 0 {
		v = ^v
	}
	return v
}

// count reads a count of items that each take at least one byte of the
// payload, and fails if fewer bytes are left. Callers still size their
// allocations by what they decode, not by the count alone (see capHint):
// an item of one byte may cost tens of bytes decoded.
func (r *wireReader) count() int {
	n := r.uint()
	if n > uint64(len(r.s)-r.off) {
		r.fail()
		return 0
	}
	return int(n)
}

func (r *wireReader) string() string {
	n := r.count()
	if r.err != nil {
		return ""
	}
	s := r.s[r.off : r.off+n]
	r.off += n
	return s
}

func (r *wireReader) strings() []string {
	r.charge(listCost)
	n := r.count()
	if n == 0 {
		return nil
	}
	ss := make([]string, 0, r.capFor(n))
	for range n {
		s := r.string()
		r.charge(itemCost + len(s))
		if r.err != nil {
			return nil
		}
		ss = append(ss, s)
	}
	if r.err != nil {
		return nil
	}
	return ss
}

// capHint bounds the map entries a decoder allocates ahead of the keys it
// has read.
const capHint = 64

// capFor returns the capacity to allocate for a list of n strings, which
// count has checked against the bytes left: n, if the strings can all be
// charged (see charge), so that a list is allocated once; else what can
// be. It is at most 16 times the bytes left and at most maxHeadSize bytes.
func (r *wireReader) capFor(n int) int {
	return min(n, max(maxHeadSize-r.cost, 0)/itemCost+1)
}

// header reads a header: its values share one backing array, as in
// http.Header.Clone.
func (r *wireReader) header() http.Header {
	r.charge(listCost)
	n := r.count()
	if n == 0 {
		return nil
	}
	h := make(http.Header, min(n, capHint))
	var values []string
	for range n {
		k := r.string()
		r.charge(keyCost + len(k) + listCost)
		m := r.count()
		if r.err != nil {
			return nil
		}
		if cap(values)-len(values) < m {
			values = make([]string, 0, max(r.capFor(m), 8))
		}
		start := len(values)
		for range m {
			v := r.string()
			r.charge(itemCost + len(v))
			if r.err != nil {
				return nil
			}
			values = append(values, v)
		}
		h[k] = values[start:len(values):len(values)]
	}
	return h
}

// done checks that the whole payload was read.
func (r *wireReader) done() error {
	if r.err == nil && r.off != len(r.s) {
		r.fail()
	}
	return r.err
}

// Flags of a requestHead's encoding.
const (
	headForceQuery = 1 << iota
	headOmitHost
	headClose
	headTLS
	headTLSResume
	headFullDuplex     // responseHead
	headResponseHeader // requestHead: a ResponseHeader follows the Header
	headDeadline       // requestHead: a Deadline follows
	headPattern        // requestHead: a Pattern and its PathValues follow
	headHijackable     // requestHead: the parent can hijack the client's connection; a LocalAddr follows
	headForm           // requestHead: a Form follows (r.Form was parsed in the parent)
	headPostForm       // requestHead: a PostForm follows
	headKeepBody       // responseHead
)

// appendWire appends h's encoding to b.
func (h *requestHead) appendWire(b []byte) []byte {
	w := newWireWriter(b)
	var flags uint64
	if h.ForceQuery {
		flags |= headForceQuery
	}
	if h.OmitHost {
		flags |= headOmitHost
	}
	if h.Close {
		flags |= headClose
	}
	if h.TLS != nil {
		flags |= headTLS
		if h.TLS.DidResume {
			flags |= headTLSResume
		}
	}
	if len(h.ResponseHeader) > 0 {
		flags |= headResponseHeader // else nothing on the wire
	}
	if h.Deadline != 0 {
		flags |= headDeadline
	}
	if h.Pattern != "" {
		flags |= headPattern // else nothing on the wire
	}
	if h.Hijackable {
		flags |= headHijackable
	}
	if h.Form != nil {
		flags |= headForm
	}
	if h.PostForm != nil {
		flags |= headPostForm
	}
	w.uint(flags)
	for _, s := range []string{h.Method, h.Scheme, h.Opaque, h.User, h.URLHost, h.Path, h.RawPath, h.RawQuery, h.Fragment, h.Proto, h.Host, h.RemoteAddr, h.RequestURI} {
		w.string(s)
	}
	w.int(int64(h.ProtoMajor))
	w.int(int64(h.ProtoMinor))
	w.int(h.ContentLength)
	w.strings(h.TransferEncoding)
	w.strings(h.Trailer)
	w.header(h.Header)
	if flags&headResponseHeader != 0 {
		w.header(h.ResponseHeader)
	}
	if flags&headDeadline != 0 {
		w.int(h.Deadline)
	}
	if flags&headPattern != 0 {
		w.string(h.Pattern)
		w.strings(h.PathValues)
	}
	if flags&headHijackable != 0 {
		w.string(h.LocalAddr)
	}
	if flags&headForm != 0 {
		w.header(h.Form)
	}
	if flags&headPostForm != 0 {
		w.header(h.PostForm)
	}
	if t := h.TLS; t != nil {
		w.uint(uint64(t.Version))
		w.uint(uint64(t.CipherSuite))
		w.string(t.ServerName)
		w.string(t.NegotiatedProtocol)
	}
	return w.b
}

// decodeWire decodes what appendWire encoded into h.
func (h *requestHead) decodeWire(p []byte) error {
	r := newWireReader(p)
	flags := r.uint()
	h.ForceQuery = flags&headForceQuery != 0
	h.OmitHost = flags&headOmitHost != 0
	h.Close = flags&headClose != 0
	h.Hijackable = flags&headHijackable != 0
	for _, s := range []*string{&h.Method, &h.Scheme, &h.Opaque, &h.User, &h.URLHost, &h.Path, &h.RawPath, &h.RawQuery, &h.Fragment, &h.Proto, &h.Host, &h.RemoteAddr, &h.RequestURI} {
		*s = r.string()
	}
	h.ProtoMajor = int(r.int())
	h.ProtoMinor = int(r.int())
	h.ContentLength = r.int()
	h.TransferEncoding = r.strings()
	h.Trailer = r.strings()
	h.Header = r.header()
	if flags&headResponseHeader != 0 {
		if h.ResponseHeader = r.header(); h.ResponseHeader == nil {
			r.fail() // the flag says it is not empty
		}
	}
	if flags&headDeadline != 0 {
		if h.Deadline = r.int(); h.Deadline == 0 {
			r.fail() // the flag says there is one
		}
	}
	if flags&headPattern != 0 {
		h.Pattern = r.string()
		h.PathValues = r.strings()
		if h.Pattern == "" || len(h.PathValues)%2 != 0 {
			r.fail() // the flag says there is one; values come in pairs
		}
	}
	if flags&headHijackable != 0 {
		h.LocalAddr = r.string()
	}
	if flags&headForm != 0 {
		if h.Form = r.header(); h.Form == nil {
			h.Form = http.Header{} // parsed, and empty
		}
	}
	if flags&headPostForm != 0 {
		if h.PostForm = r.header(); h.PostForm == nil {
			h.PostForm = http.Header{}
		}
	}
	if flags&headTLS != 0 {
		h.TLS = &tlsState{
			Version:            uint16(r.uint()),
			CipherSuite:        uint16(r.uint()),
			ServerName:         r.string(),
			NegotiatedProtocol: r.string(),
			DidResume:          flags&headTLSResume != 0,
		}
	}
	return r.done()
}

// appendWire appends h's encoding to b.
func (h *responseHead) appendWire(b []byte) []byte {
	w := newWireWriter(b)
	var flags uint64
	if h.FullDuplex {
		flags |= headFullDuplex
	}
	if h.KeepBody {
		flags |= headKeepBody
	}
	w.uint(flags)
	w.int(int64(h.Status))
	w.header(h.Header)
	w.strings(h.Trailer)
	return w.b
}

// decodeWire decodes what appendWire encoded into h.
func (h *responseHead) decodeWire(p []byte) error {
	r := newWireReader(p)
	flags := r.uint()
	h.FullDuplex = flags&headFullDuplex != 0
	h.KeepBody = flags&headKeepBody != 0
	h.Status = int(r.int())
	h.Header = r.header()
	h.Trailer = r.strings()
	h.cost = int32(r.cost)
	return r.done()
}

// appendWire appends e's encoding to b.
func (e *bodyEnd) appendWire(b []byte) []byte {
	w := newWireWriter(b)
	w.header(e.Trailer)
	return w.b
}

// decodeWire decodes what appendWire encoded into e.
func (e *bodyEnd) decodeWire(p []byte) error {
	r := newWireReader(p)
	e.Trailer = r.header()
	e.cost = int32(r.cost)
	return r.done()
}

// appendWire appends m's encoding to b.
func (m *ready) appendWire(b []byte) []byte {
	w := newWireWriter(b)
	w.int(int64(m.Pid))
	w.string(m.Err)
	return w.b
}

// decodeWire decodes what appendWire encoded into m.
func (m *ready) decodeWire(p []byte) error {
	r := newWireReader(p)
	m.Pid = int(r.int())
	m.Err = r.string()
	return r.done()
}

// The messages a parent reads from its child.
var (
	_ wireMessage = (*ready)(nil)
	_ wireMessage = (*responseHead)(nil)
	_ wireMessage = (*bodyEnd)(nil)
)

// maxHeadSize bounds a head, or a message of trailers: its encoding, so
// that it fits in a frame, and what it costs decoded (see wireReader.charge).
// A sender checks it before it sends, with wireSize's bound: a message too
// large fails its own request, never the connection.
const maxHeadSize = frame.MaxPayload - 4<<10

// varintMax is the most bytes a varint takes.
const varintMax = binary.MaxVarintLen64

// stringsSize bounds the encoding of a list of strings and is what its
// receiver charges for it decoded.
func stringsSize(ss []string) int {
	n := listCost
	for _, s := range ss {
		n += itemCost + len(s)
	}
	return n
}

// headerSize bounds the encoding of a header and is what its receiver
// charges for it decoded.
func headerSize(h http.Header) int {
	n := listCost
	for k, vs := range h {
		n += keyCost + len(k) + stringsSize(vs)
	}
	return n
}

// wireSize bounds the size of h's encoding.
func (h *requestHead) wireSize() int {
	n := 64 + stringsSize(h.TransferEncoding) + stringsSize(h.Trailer) + headerSize(h.Header) + headerSize(h.ResponseHeader)
	n += headerSize(h.Form) + headerSize(h.PostForm)
	n += varintMax + len(h.Pattern) + stringsSize(h.PathValues)
	n += varintMax + len(h.LocalAddr)
	for _, s := range []string{h.Method, h.Scheme, h.Opaque, h.User, h.URLHost, h.Path, h.RawPath, h.RawQuery, h.Fragment, h.Proto, h.Host, h.RemoteAddr, h.RequestURI} {
		n += varintMax + len(s)
	}
	if t := h.TLS; t != nil {
		n += 2*varintMax + len(t.ServerName) + len(t.NegotiatedProtocol)
	}
	return n
}

// wireSize bounds the size of h's encoding.
func (h *responseHead) wireSize() int {
	return 64 + headerSize(h.Header) + stringsSize(h.Trailer)
}
