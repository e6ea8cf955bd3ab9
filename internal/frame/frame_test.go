package frame

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, 64)
	if err := WritePreamble(w.Buffered(), 7); err != nil {
		t.Fatal(err)
	}
	frames := []struct {
		kind, flags uint8
		id          uint64
		payload     []byte
	}{
		{1, 0, 0, nil},
		{2, 3, 1<<64 - 1, []byte("hello")},
		{3, 0, 42, bytes.Repeat([]byte{0xAB}, 1000)}, // larger than the buffer
	}
	for _, f := range frames {
		// Split the payload in two parts to check they are concatenated.
		half := len(f.payload) / 2
		if err := w.WriteFrame(f.kind, f.flags, f.id, f.payload[:half], f.payload[half:]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}

	r := NewReader(&buf, 64)
	if err := ReadPreamble(r.Buffered(), 7); err != nil {
		t.Fatal(err)
	}
	for i, f := range frames {
		h, err := r.ReadHeader()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if h.Kind != f.kind || h.Flags != f.flags || h.ID != f.id || int(h.Len) != len(f.payload) {
			t.Fatalf("frame %d: header %+v, want kind %d flags %d id %d len %d", i, h, f.kind, f.flags, f.id, len(f.payload))
		}
		p := make([]byte, h.Len)
		if err := r.ReadPayload(p); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, f.payload) {
			t.Fatalf("frame %d: payload differs", i)
		}
	}
	if _, err := r.ReadHeader(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
}

func TestPreambleErrors(t *testing.T) {
	good := func(v uint32) []byte {
		var b bytes.Buffer
		WritePreamble(&b, v)
		return b.Bytes()
	}
	tests := []struct {
		name  string
		input []byte
		check func(error) bool
	}{
		{"empty", nil, func(err error) bool { return err == io.EOF }},
		{"short", good(1)[:5], func(err error) bool { return err == io.ErrUnexpectedEOF }},
		{"not protocol", []byte("hello, world\n"), func(err error) bool { return errors.Is(err, ErrNotProtocol) }},
		{"other version", good(2), func(err error) bool {
			var ve *VersionError
			return errors.As(err, &ve) && ve.Got == 2 && ve.Want == 1
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ReadPreamble(bytes.NewReader(tt.input), 1)
			if !tt.check(err) {
				t.Fatalf("ReadPreamble: %v", err)
			}
		})
	}
}

func TestMalformedHeaders(t *testing.T) {
	header := func(n uint32, reserved uint16) []byte {
		b := make([]byte, HeaderSize)
		binary.BigEndian.PutUint32(b, n)
		binary.BigEndian.PutUint16(b[6:], reserved)
		return b
	}
	tests := []struct {
		name  string
		input []byte
		want  func(error) bool
	}{
		{"too long", header(MaxPayload+1, 0), func(err error) bool {
			var fe *FormatError
			return errors.As(err, &fe)
		}},
		{"reserved set", header(1, 1), func(err error) bool {
			var fe *FormatError
			return errors.As(err, &fe)
		}},
		{"truncated header", header(1, 0)[:9], func(err error) bool { return err == io.ErrUnexpectedEOF }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewReader(bytes.NewReader(tt.input), 64).ReadHeader()
			if !tt.want(err) {
				t.Fatalf("ReadHeader: %v", err)
			}
		})
	}
}

func TestTruncatedPayload(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, 64)
	w.WriteFrame(1, 0, 1, []byte("0123456789"))
	w.Flush()
	r := NewReader(bytes.NewReader(buf.Bytes()[:buf.Len()-3]), 64)
	h, err := r.ReadHeader()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.ReadPayload(make([]byte, h.Len)); err != io.ErrUnexpectedEOF {
		t.Fatalf("ReadPayload: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestWriteFrameTooLargePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("WriteFrame of an oversized payload did not panic")
		}
	}()
	NewWriter(io.Discard, 64).WriteFrame(1, 0, 1, make([]byte, MaxPayload+1))
}

// A header appended with length 0 and set once its payload follows reads
// back as one frame with that payload; a payload over MaxPayload fails.
func TestSetLength(t *testing.T) {
	b := AppendPreamble(nil, 7)
	start := len(b)
	b = AppendHeader(b, 3, 1, 42, 0)
	b = append(b, "payload"...)
	if err := SetLength(b[start:]); err != nil {
		t.Fatal(err)
	}
	r := NewReader(bytes.NewReader(b), 64)
	if err := ReadPreamble(r.Buffered(), 7); err != nil {
		t.Fatal(err)
	}
	hdr, err := r.ReadHeader()
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, hdr.Len)
	if err := r.ReadPayload(p); err != nil {
		t.Fatal(err)
	}
	if hdr.Kind != 3 || hdr.Flags != 1 || hdr.ID != 42 || string(p) != "payload" {
		t.Fatalf("read %+v %q, want kind 3, flags 1, id 42, %q", hdr, p, "payload")
	}
	big := AppendHeader(nil, 3, 0, 1, 0)
	big = append(big, make([]byte, MaxPayload+1)...)
	if err := SetLength(big); err == nil {
		t.Fatal("SetLength of an oversized payload did not fail")
	}
}

func BenchmarkWriteReadFrame(b *testing.B) {
	payload := make([]byte, 32<<10)
	pr, pw := io.Pipe()
	go func() {
		w := NewWriter(pw, 64<<10)
		for i := 0; i < b.N; i++ {
			w.WriteFrame(5, 0, uint64(i), payload)
		}
		w.Flush()
		pw.Close()
	}()
	r := NewReader(pr, 64<<10)
	p := make([]byte, len(payload))
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		h, err := r.ReadHeader()
		if err != nil {
			b.Fatal(err)
		}
		if err := r.ReadPayload(p[:h.Len]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFrames measures framing: appending a frame's header and payload
// to a buffer and reading it back, as the pipes do.
func BenchmarkFrames(b *testing.B) {
	for _, size := range []int{0, 100, 64 << 10} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			payload := make([]byte, size)
			var buf []byte
			var src bytes.Reader
			r := NewReader(&src, 64<<10)
			dst := make([]byte, size)
			b.SetBytes(int64(HeaderSize + size))
			b.ReportAllocs()
			for b.Loop() {
				buf = AppendHeader(buf[:0], 5, 0, 1, size)
				buf = append(buf, payload...)
				src.Reset(buf)
				r.Buffered().Reset(&src)
				h, err := r.ReadHeader()
				if err != nil || int(h.Len) != size {
					b.Fatalf("header %+v, %v", h, err)
				}
				if err := r.ReadPayload(dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
