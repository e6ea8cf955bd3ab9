package subproc

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRequestHeadRoundTrip(t *testing.T) {
	r := httptest.NewRequest("PATCH", "http://example.com/a%2Fb/c?x=1&x=2&y", strings.NewReader("body"))
	r.Header.Add("X-Multi", "one")
	r.Header.Add("X-Multi", "two")
	r.Header.Set("Connection", "X-Private, keep-alive")
	r.Header.Set("X-Private", "secret")
	r.Header.Set("Keep-Alive", "timeout=5")
	r.Header.Set("Proxy-Authorization", "Basic x")
	r.Header.Set("Te", "gzip, trailers")
	r.Header.Set("Upgrade", "websocket")
	r.Trailer = http.Header{"X-Sum": nil}
	r.RemoteAddr = "10.1.2.3:4567"

	enc, dec := newEncoder(), newDecoder()
	p, err := enc.encode(newRequestHead(r))
	require.NoError(t, err)
	var head requestHead
	require.NoError(t, dec.decode(p, &head))
	got, err := head.request(new(url.URL))
	require.NoError(t, err)
	assert.Equal(t, "PATCH", got.Method, "URL: %s %q raw %q query %q", got.Method, got.URL.Path, got.URL.RawPath, got.URL.RawQuery)
	assert.Equal(t, "/a/b/c", got.URL.Path, "URL: %s %q raw %q query %q", got.Method, got.URL.Path, got.URL.RawPath, got.URL.RawQuery)
	assert.Equal(t, "/a%2Fb/c", got.URL.RawPath, "URL: %s %q raw %q query %q", got.Method, got.URL.Path, got.URL.RawPath, got.URL.RawQuery)
	assert.Equal(t, "x=1&x=2&y", got.URL.RawQuery, "URL: %s %q raw %q query %q", got.Method, got.URL.Path, got.URL.RawPath, got.URL.RawQuery)
	assert.Equal(t, "example.com", got.Host, "host %q remote %q uri %q length %d", got.Host, got.RemoteAddr, got.RequestURI, got.ContentLength)
	assert.Equal(t, r.RemoteAddr, got.RemoteAddr, "host %q remote %q uri %q length %d", got.Host, got.RemoteAddr, got.RequestURI, got.ContentLength)
	assert.Equal(t, r.RequestURI, got.RequestURI, "host %q remote %q uri %q length %d", got.Host, got.RemoteAddr, got.RequestURI, got.ContentLength)
	assert.EqualValues(t, 4, got.ContentLength, "host %q remote %q uri %q length %d", got.Host, got.RemoteAddr, got.RequestURI, got.ContentLength)
	assert.Equal(t, []string{"one", "two"}, got.Header["X-Multi"], "X-Multi")
	for _, k := range []string{"Connection", "X-Private", "Keep-Alive", "Proxy-Authorization", "Upgrade"} {
		assert.NotContains(t, got.Header, k, "hop-by-hop header %s = %q reached the child", k, got.Header[k])
	}
	assert.Equal(t, "trailers", got.Header.Get("Te"), "Te")
	assert.Contains(t, got.Trailer, "X-Sum", "Trailer = %v, want the declared X-Sum", got.Trailer)
	assert.Len(t, got.Trailer, 1, "Trailer = %v, want the declared X-Sum", got.Trailer)

	// A second message of the same type reuses the gob type description.
	p2, err := enc.encode(&requestHead{Method: "GET", Path: "/"})
	require.NoError(t, err)
	assert.Less(t, len(p2), len(p), "second message is %d bytes, first %d: type info sent twice?", len(p2), len(p))
	var head2 requestHead
	if err := dec.decode(p2, &head2); err != nil || head2.Method != "GET" || head2.Header != nil {
		t.Fatalf("second message: %+v, %v", head2, err)
	}
}

func TestDecodeRejectsBadFraming(t *testing.T) {
	enc := newEncoder()
	p, err := enc.encode(&responseHead{Status: 200, Header: http.Header{"A": {"b"}}})
	require.NoError(t, err)
	good := append([]byte(nil), p...)
	tests := []struct {
		name string
		p    []byte
	}{
		{"empty", nil},
		{"truncated", good[:len(good)-1]},
		{"trailing garbage", append(append([]byte(nil), good...), 1, 2, 3)},
		{"huge length", []byte{0xF8, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}},
		{"random", []byte("this is not gob at all")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v responseHead
			if err := newDecoder().decode(tt.p, &v); err == nil {
				t.Fatalf("decode accepted %q as %+v", tt.p, v)
			}
		})
	}
}

// testChild returns a parent-side child whose pipe from the child carries
// input, already past the handshake.
func testChild(input []byte) *child {
	// The input is all the child will ever write: it is as good as dead.
	dead := &fakeProcess{exited: make(chan struct{})}
	dead.Kill()
	c := newChild(&Handle{name: "garbage", opts: Options{Logger: discardLogger()}.withDefaults()}, 0, dead, newConn(bytes.NewReader(input), nopWriteCloser{io.Discard}), newLocalWord())
	c.ring = newLocalRing()
	return c
}

// refFrame returns a kindDataRef frame for stream id naming n bytes in slot.
func refFrame(id uint64, slot, n uint32) outFrame {
	ref := binary.BigEndian.AppendUint32(nil, slot)
	return outFrame{kind: kindDataRef, id: id, data: binary.BigEndian.AppendUint32(ref, n)}
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// frames builds a byte stream of frames.
func frames(fs ...outFrame) []byte {
	var b bytes.Buffer
	w := frame.NewWriter(&b, 1024)
	enc := newEncoder()
	for _, f := range fs {
		if f.msg != nil {
			p, err := enc.encode(f.msg)
			if err != nil {
				panic(err)
			}
			f.data = p
		}
		w.WriteFrame(f.kind, f.flags, f.id, f.data)
	}
	w.Flush()
	return b.Bytes()
}

// Bad input from a child is a protocol error that fails the pending request,
// never a panic or a wrong answer.
func TestReadLoopRejectsBadInput(t *testing.T) {
	head := &responseHead{Status: 200}
	tests := []struct {
		name      string
		input     []byte
		completes bool // the request's response was complete before the bad input
	}{
		{"unknown kind", frames(outFrame{kind: 200, id: 1}), false},
		{"unknown request id", frames(outFrame{kind: kindResponse, id: 99, msg: head}), false},
		{"id zero", frames(outFrame{kind: kindResponse, id: 0, msg: head}), false},
		{"body before head", frames(outFrame{kind: kindData, id: 1, data: []byte("x")}), false},
		{"second final head", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindResponse, id: 1, msg: head}), false},
		{"status out of range", frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 42}}), false},
		{"message after end", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindEnd, id: 1}, outFrame{kind: kindData, id: 1, data: []byte("x")}), true},
		{"oversized chunk", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindData, id: 1, data: make([]byte, chunkSize+1)}), false},
		{"window overrun", frames(append([]outFrame{{kind: kindResponse, id: 1, msg: head}}, repeatFrame(outFrame{kind: kindData, id: 1, data: make([]byte, chunkSize)}, window/chunkSize+1)...)...), false},
		{"bad gob", frames(outFrame{kind: kindResponse, id: 1, data: []byte{3, 1, 2, 3}}), false},
		// The parent decodes nothing of a child's with gob, which keeps
		// every type a stream defines for the stream's life.
		{"trailers in gob", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindEnd, id: 1, data: gobPayload(&bodyEnd{Trailer: http.Header{"X": {"y"}}})}), false},
		// An honest child's Hijack fails unless the request head said
		// Hijackable (an HTTP/1 request whose ResponseWriter can hijack).
		{"hijack of a request that cannot be hijacked", frames(outFrame{kind: kindHijack, id: 1}), false},
		{"window of the wrong size", frames(outFrame{kind: kindWindow, id: 1, data: []byte{1}}), false},
		{"pong never pinged", frames(outFrame{kind: kindPong, id: 5}), false},
		{"random bytes", []byte("\x00\x00\x00\x05garbage and more garbage"), false},
		{"reserved bits", append([]byte{0, 0, 0, 0, kindEnd, 0, 1, 0}, make([]byte, 8)...), false},
		{"ring chunk before head", frames(refFrame(1, 0, 1)), false},
		{"ring reference of the wrong size", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindDataRef, id: 1, data: []byte{0, 0, 0, 0}}), false},
		{"ring slot out of range", frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, ringSlots, 1)), false},
		{"ring slot far out of range", frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, 1<<31, 1)), false},
		{"empty ring chunk", frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, 0, 0)), false},
		{"oversized ring chunk", frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, 0, chunkSize+1)), false},
		{"ring slot handed over twice", frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, 3, 10), refFrame(1, 3, 10)), false},
		{"ring chunk after end", frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindEnd, id: 1}, refFrame(1, 0, 1)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testChild(tt.input)
			c.nextID = 1
			s := newStream(1, window)
			c.pending[1] = s
			err := c.readFrames()
			var pe *protocolError
			require.True(t, errors.As(err, &pe), "readFrames: %v, want a protocol error", err)
			c.fail(err, nil)
			for {
				ev, err := s.next(nil)
				if err != nil {
					require.True(t, errors.As(err, &pe), "pending request failed with %v, want the protocol error", err)
					break
				}
				ev.release()
				if ev.kind == kindEnd {
					require.True(t, tt.completes, "the pending request completed")
					break
				}
			}
		})
	}
}

// gobPayload returns v gob-encoded, with the type's definition, as a gob
// stream's first message carries it.
func gobPayload(v any) []byte {
	var b bytes.Buffer
	if err := gob.NewEncoder(&b).Encode(v); err != nil {
		panic(err)
	}
	return b.Bytes()
}

func repeatFrame(f outFrame, n int) []outFrame {
	fs := make([]outFrame, n)
	for i := range fs {
		fs[i] = f
	}
	return fs
}

// Truncated input ends the read loop with an error that is not a success.
func TestReadLoopTruncated(t *testing.T) {
	full := frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 200}})
	for n := 1; n < len(full); n++ {
		c := testChild(full[:n])
		c.nextID = 1
		c.pending[1] = newStream(1, window)
		if err := c.readFrames(); err == nil || err == io.EOF {
			t.Fatalf("truncated at %d: readFrames returned %v", n, err)
		}
	}
}

// FuzzReadFrames feeds arbitrary bytes to the parent's reader: it must
// never panic, and whatever it accepts must keep the stream consistent.
func FuzzReadFrames(f *testing.F) {
	head := &responseHead{Status: 200, Header: http.Header{"A": {"b"}}, Trailer: []string{"X"}}
	f.Add(frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindData, id: 1, data: []byte("hi")}, outFrame{kind: kindEnd, id: 1, msg: &bodyEnd{Trailer: http.Header{"X": {"y"}}}}))
	f.Add(frames(outFrame{kind: kindWindow, id: 1, data: []byte{0, 0, 1, 0}}, outFrame{kind: kindPong, id: 1}, outFrame{kind: kindAbort, id: 1}))
	f.Add(frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 103}}, outFrame{kind: kindResponse, id: 1, msg: head}))
	f.Add(frames(outFrame{kind: kindResponse, id: 1, msg: head}, refFrame(1, 0, 100), refFrame(1, 1, chunkSize), refFrame(1, 0, 1), outFrame{kind: kindEnd, id: 1}))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, input []byte) {
		c := testChild(input)
		c.nextID = 2
		c.nextSeq = 1
		c.pings[1] = make(chan struct{})
		s := newStream(1, window)
		c.pending[1] = s
		c.pending[2] = newStream(2, window)
		err := c.readFrames()
		require.Error(t, err, "readFrames returned nil at the end of input")
		c.fail(err, nil)
		s.mu.Lock()
		defer s.mu.Unlock()
		require.LessOrEqual(t, s.queued, window, "stream holds %d bytes", s.queued)
	})
}

// The heads' own encoding round-trips every field, and a corrupt or
// truncated encoding is an error, never a panic or a large allocation.
func TestHeadEncoding(t *testing.T) {
	req := &requestHead{
		Method: "POST", Scheme: "https", Opaque: "o", User: "u:p", URLHost: "h:1",
		Path: "/p", RawPath: "/p", RawQuery: "q=1", Fragment: "f", ForceQuery: true, OmitHost: true,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"A": {"1", "2"}, "B": {""}, "C": {"3"}},
		Host:   "example.com", ContentLength: -1, TransferEncoding: []string{"chunked"},
		Close: true, Trailer: []string{"X-Sum"}, RemoteAddr: "1.2.3.4:5", RequestURI: "/p?q=1",
		TLS:            &tlsState{Version: 0x304, CipherSuite: 0x1301, ServerName: "s", NegotiatedProtocol: "h2", DidResume: true},
		ResponseHeader: http.Header{"Content-Type": {"text/plain"}, "X-Mw": {"a", "b"}},
	}
	resp := &responseHead{Status: 418, Header: http.Header{"X": {"y"}}, Trailer: []string{"T"}, FullDuplex: true}
	for _, tt := range []struct {
		in  wireMessage
		out wireMessage
	}{
		{req, new(requestHead)},
		{resp, new(responseHead)},
		{&requestHead{}, new(requestHead)},
		{&responseHead{}, new(responseHead)},
		{&bodyEnd{Trailer: http.Header{"X-Sum": {"1"}, "Y": {"a", ""}}}, new(bodyEnd)},
		{&bodyEnd{}, new(bodyEnd)},
		{&ready{Pid: 4321, Err: "module \"m\": no database"}, new(ready)},
		{&ready{Pid: 1}, new(ready)},
	} {
		p := tt.in.appendWire(nil)
		require.NoError(t, tt.out.decodeWire(p), "%T", tt.in)
		// What a decoded message records it cost is the sum its sender
		// checks (see wireReader.charge), and is not sent.
		switch m := tt.out.(type) {
		case *responseHead:
			assert.Equal(t, headerSize(m.Header)+stringsSize(m.Trailer), int(m.cost))
			m.cost = 0
		case *bodyEnd:
			assert.Equal(t, headerSize(m.Trailer), int(m.cost))
			m.cost = 0
		}
		assert.Equal(t, tt.in, tt.out, "round trip:\n got %+v\nwant %+v", tt.out, tt.in)
		for n := range len(p) {
			assert.Error(t, reflect.New(reflect.TypeOf(tt.out).Elem()).Interface().(wireMessage).decodeWire(p[:n]), "%T: truncated to %d of %d bytes: no error", tt.in, n, len(p))
		}
		assert.Error(t, tt.out.decodeWire(append(p, 0)), "%T: trailing byte: no error", tt.in)
	}
	// An empty ResponseHeader costs nothing on the wire; a flag that
	// announces one and an empty header is malformed.
	plain := (&requestHead{Method: "GET", Path: "/"}).appendWire(nil)
	empty := (&requestHead{Method: "GET", Path: "/", ResponseHeader: http.Header{}}).appendWire(nil)
	assert.Equal(t, plain, empty, "an empty ResponseHeader changes the encoding:\n%x\n%x", plain, empty)
	flagged := append([]byte(nil), plain...)
	flagged[1] |= headResponseHeader
	flagged = binary.AppendUvarint(flagged, 0)
	assert.Error(t, new(requestHead).decodeWire(flagged), "an announced ResponseHeader without keys: no error")

	// A header that claims a billion keys in a few bytes.
	huge := []byte{wireVersion, 0, 0x00}
	huge = binary.AppendUvarint(huge[:2], 200) // status
	huge = binary.AppendUvarint(huge, 1<<30)   // keys
	allocs := testing.AllocsPerRun(10, func() {
		require.Error(t, new(responseHead).decodeWire(huge), "a billion keys in 8 bytes: no error")
	})
	assert.LessOrEqual(t, allocs, 2.0, "%v allocations to reject a huge count", allocs)
}

// What a head costs decoded is bounded as its encoding is: a head of
// empty values, a byte each on the wire and 16 decoded, is refused once its
// decoded cost passes maxHeadSize, before decoding allocates much more than
// the frame, and a head that the sender's check (headerSize) accepts is
// never refused.
func TestHeadDecodedCostBounded(t *testing.T) {
	empties := func(n int) http.Header { return http.Header{"X": make([]string, n)} }
	fits := (maxHeadSize - 64 - 2*listCost - keyCost - 1 - listCost) / itemCost
	head := &responseHead{Status: 200, Header: empties(fits)}
	require.LessOrEqual(t, head.wireSize(), maxHeadSize)
	var got responseHead
	require.NoError(t, got.decodeWire(head.appendWire(nil)), "a head of %d empty values, which its sender accepts", fits)
	assert.Len(t, got.Header["X"], fits)

	// Eight times as many values fit in a frame, for a sender that does
	// not check.
	over := &responseHead{Status: 200, Header: empties(8 * fits)}
	p := over.appendWire(nil)
	require.Less(t, len(p), frame.MaxPayload, "the test's head does not fit in a frame")
	require.Greater(t, over.wireSize(), maxHeadSize, "the sender's check accepts the head")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err := new(responseHead).decodeWire(p)
	runtime.ReadMemStats(&after)
	require.ErrorIs(t, err, errHeadTooLarge)
	allocated := after.TotalAlloc - before.TotalAlloc
	assert.Less(t, allocated, uint64(2*maxHeadSize), "refusing a head of %d bytes allocated %d", len(p), allocated)

	// The same for trailers.
	end := &bodyEnd{Trailer: empties(8 * fits)}
	require.ErrorIs(t, new(bodyEnd).decodeWire(end.appendWire(nil)), errHeadTooLarge)
}

// BenchmarkHeads measures encoding and decoding a typical request head and
// response head: the messages that every request costs.
func BenchmarkHeads(b *testing.B) {
	r := httptest.NewRequest("GET", "http://example.com/api/items?page=2", nil)
	r.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)")
	r.Header.Set("Accept", "text/html,application/xhtml+xml")
	r.Header.Set("Accept-Encoding", "gzip, deflate")
	r.Header.Set("Cookie", "session=0123456789abcdef")
	r.RemoteAddr = "192.0.2.1:54321"
	for _, bc := range []struct {
		name string
		head any
		into func() any
	}{
		{"request", newRequestHead(r), func() any { return new(requestHead) }},
		{"response", &responseHead{Status: 200, Header: http.Header{
			"Content-Type":   {"application/json"},
			"Cache-Control":  {"no-store"},
			"Content-Length": {"1234"},
		}}, func() any { return new(responseHead) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			enc, dec := newEncoder(), newDecoder()
			var p []byte // reused, as a conn's pending bytes are
			b.ReportAllocs()
			for b.Loop() {
				var err error
				p, err = enc.appendPayload(p[:0], bc.head)
				if err != nil {
					b.Fatal(err)
				}
				if err := dec.decode(p, bc.into()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
