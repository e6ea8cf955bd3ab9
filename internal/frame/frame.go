// Package frame reads and writes the frames that carry subproc's messages
// over a pipe.
//
// A stream of frames starts with a preamble (an 8-byte magic string and a
// 4-byte protocol version) so that a peer that is not speaking the protocol is
// recognised at its first bytes. Each frame then is a 16-byte header followed
// by its payload:
//
//	offset  size  field
//	0       4     payload length, big endian, at most MaxPayload
//	4       1     kind
//	5       1     flags
//	6       2     reserved, zero
//	8       8     stream id, big endian
//
// The package knows nothing of what kinds and flags mean; it only moves
// frames and rejects those that cannot be valid (too long, non-zero reserved
// bytes). A Reader and a Writer are each meant to be used by one goroutine.
package frame

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// HeaderSize is the size of a frame header in bytes.
const HeaderSize = 16

// MaxPayload is the largest payload a frame may carry. A reader rejects a
// frame that announces more, before allocating anything for it.
const MaxPayload = 8 << 20

// magic opens every stream of frames.
var magic = [8]byte{'S', 'U', 'B', 'P', 'R', 'O', 'C', 0}

// ErrNotProtocol reports that a stream did not start with the preamble: the
// peer is not a subproc process, or wrote something else first.
var ErrNotProtocol = errors.New("frame: stream does not start with the subproc preamble")

// A VersionError reports a preamble with a protocol version the reader does
// not speak.
type VersionError struct {
	Got, Want uint32
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("frame: peer speaks protocol version %d, want %d", e.Got, e.Want)
}

// A FormatError reports a frame header that cannot be valid.
type FormatError struct {
	Reason string
}

func (e *FormatError) Error() string { return "frame: malformed frame: " + e.Reason }

// Header is a decoded frame header.
type Header struct {
	Len   uint32 // payload length
	Kind  uint8
	Flags uint8
	ID    uint64 // stream id; its meaning depends on Kind
}

// AppendPreamble appends the magic string and version that start a stream.
func AppendPreamble(dst []byte, version uint32) []byte {
	dst = append(dst, magic[:]...)
	return binary.BigEndian.AppendUint32(dst, version)
}

// AppendHeader appends the header of a frame whose payload is n bytes long;
// the caller appends the payload. It panics if n exceeds MaxPayload: that
// is a bug in the caller, never input from the peer.
func AppendHeader(dst []byte, kind, flags uint8, id uint64, n int) []byte {
	if n > MaxPayload {
		panic(fmt.Sprintf("frame: payload of %d bytes exceeds the limit of %d", n, MaxPayload))
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	dst = append(dst, kind, flags, 0, 0)
	return binary.BigEndian.AppendUint64(dst, id)
}

// SetLength sets the payload length in the header that starts frame, to
// what follows the header: a caller that appends a header of length 0 and
// then the payload learns the length only once it is appended. It fails if
// the payload exceeds MaxPayload.
func SetLength(frame []byte) error {
	n := len(frame) - HeaderSize
	if n > MaxPayload {
		return fmt.Errorf("frame: payload of %d bytes exceeds the limit of %d", n, MaxPayload)
	}
	binary.BigEndian.PutUint32(frame, uint32(n))
	return nil
}

// WritePreamble writes the magic string and version that start a stream.
func WritePreamble(w io.Writer, version uint32) error {
	var b [12]byte
	copy(b[:8], magic[:])
	binary.BigEndian.PutUint32(b[8:], version)
	_, err := w.Write(b[:])
	return err
}

// ReadPreamble reads the start of a stream and checks its magic string and
// version. It returns ErrNotProtocol or a *VersionError when they do not match,
// and io.EOF or io.ErrUnexpectedEOF when the stream ends first.
func ReadPreamble(r io.Reader, version uint32) error {
	var b [12]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return err
	}
	if [8]byte(b[:8]) != magic {
		return ErrNotProtocol
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != version {
		return &VersionError{Got: v, Want: version}
	}
	return nil
}

// A Reader reads frames from a buffered stream.
type Reader struct {
	br  *bufio.Reader
	hdr [HeaderSize]byte
}

// NewReader returns a Reader that reads from r through a buffer of size
// bytes.
func NewReader(r io.Reader, size int) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, size)}
}

// Buffered returns the underlying buffered reader, for reading the preamble.
func (r *Reader) Buffered() *bufio.Reader { return r.br }

// ReadHeader reads the next frame header. The caller must then consume the
// payload with ReadPayload or Discard before reading the next header. At a
// clean end of stream it returns io.EOF; a stream that ends inside a header
// gives io.ErrUnexpectedEOF.
func (r *Reader) ReadHeader() (Header, error) {
	if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		return Header{}, err
	}
	h := Header{
		Len:   binary.BigEndian.Uint32(r.hdr[0:4]),
		Kind:  r.hdr[4],
		Flags: r.hdr[5],
		ID:    binary.BigEndian.Uint64(r.hdr[8:16]),
	}
	if r.hdr[6] != 0 || r.hdr[7] != 0 {
		return h, &FormatError{Reason: "reserved bytes are not zero"}
	}
	if h.Len > MaxPayload {
		return h, &FormatError{Reason: fmt.Sprintf("payload of %d bytes exceeds the limit of %d", h.Len, MaxPayload)}
	}
	return h, nil
}

// ReadPayload reads exactly len(p) bytes of payload into p. A stream that
// ends first gives io.ErrUnexpectedEOF.
func (r *Reader) ReadPayload(p []byte) error {
	_, err := io.ReadFull(r.br, p)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// Discard skips n bytes of payload.
func (r *Reader) Discard(n int) error {
	_, err := r.br.Discard(n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// A Writer writes frames to a buffered stream. Nothing reaches the
// underlying writer until the buffer fills or Flush is called. (subproc's
// own pipes append frames with AppendHeader; tests build input with a
// Writer.)
type Writer struct {
	bw  *bufio.Writer
	hdr [HeaderSize]byte
}

// NewWriter returns a Writer that writes to w through a buffer of size bytes.
func NewWriter(w io.Writer, size int) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, size)}
}

// Buffered returns the underlying buffered writer, for writing the preamble.
func (w *Writer) Buffered() *bufio.Writer { return w.bw }

// WriteFrame writes one frame whose payload is the concatenation of the
// parts. It panics if the payload exceeds MaxPayload: that is a bug in the
// caller, never input from the peer.
func (w *Writer) WriteFrame(kind, flags uint8, id uint64, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	AppendHeader(w.hdr[:0], kind, flags, id, n) // panics over MaxPayload
	if _, err := w.bw.Write(w.hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := w.bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// Flush writes any buffered frames to the underlying writer.
func (w *Writer) Flush() error { return w.bw.Flush() }
