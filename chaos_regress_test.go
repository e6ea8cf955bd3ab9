package subproc

// Regression tests for the bugs the chaos suite (chaos_test.go) found.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hugeMapCount returns the payload of msg from enc, whose one map holds
// the single entry "A": ["b"], with the map's entry count replaced by four
// billion.
func hugeMapCount(t *testing.T, enc *encoder, msg any) []byte {
	t.Helper()
	p, err := enc.encode(msg)
	require.NoError(t, err)
	entry := []byte("\x01\x01A\x01\x01b") // count 1, "A", one value, "b", in either encoding
	if _, ok := msg.(wireMessage); ok {
		i := bytes.Index(p, entry)
		require.GreaterOrEqual(t, i, 0, "no map entry in %q", p)
		huge := binary.AppendUvarint(nil, 0xFA000000)
		return append(append(append([]byte(nil), p[:i]...), huge...), p[i+1:]...)
	}
	// The last gob message of the payload is the value.
	var start, size, w int
	for off := 0; off < len(p); {
		n, k := gobUint(p[off:])
		start, size, w = off, int(n), k
		off += k + int(n)
	}
	value := p[start+w : start+w+size]
	i := bytes.Index(value, entry)
	require.GreaterOrEqual(t, i, 0, "no map entry in %q", value)
	huge := []byte{0xFC, 0xFA, 0x00, 0x00, 0x00} // 0xFA000000 entries
	nv := append(append(append([]byte(nil), value[:i]...), huge...), value[i+1:]...)
	out := append([]byte(nil), p[:start]...)
	out = append(out, byte(len(nv))) // below 0x80: one byte
	return append(out, nv...)
}

// A message whose map claims billions of entries made gob allocate a map of
// that size before reading any entry: a hundred bytes from a broken child
// made the parent allocate gigabytes and stall for minutes (found by
// FuzzReadFrames). It must fail to decode, allocating about its own size.
func TestDecodeHugeMapCount(t *testing.T) {
	one := http.Header{"A": {"b"}}
	for _, tt := range []struct {
		name string
		msg  any
		into func() any
	}{
		{"responseHead", &responseHead{Status: 200, Header: one}, func() any { return new(responseHead) }},
		{"bodyEnd", &bodyEnd{Trailer: one}, func() any { return new(bodyEnd) }},
		{"requestHead", &requestHead{Method: "GET", Header: one}, func() any { return new(requestHead) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := hugeMapCount(t, newEncoder(), tt.msg)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := newDecoder().decode(p, tt.into())
			runtime.ReadMemStats(&after)
			assert.Error(t, err, "decode of a map claiming 4e9 entries in %d bytes succeeded", len(p))
			if d := after.TotalAlloc - before.TotalAlloc; d > 1<<20 {
				t.Errorf("decoding %d bytes allocated %d bytes", len(p), d)
			}
		})
	}
}

// Decoding keeps a message's maps nil when it carries none, and fills them
// when it does.
func TestDecodeMapsNilWhenEmpty(t *testing.T) {
	enc, dec := newEncoder(), newDecoder()
	for _, msg := range []*responseHead{{Status: 204}, {Status: 200, Header: http.Header{"A": {"b"}}}} {
		p, err := enc.encode(msg)
		require.NoError(t, err)
		var got responseHead
		require.NoError(t, dec.decode(p, &got))
		got.cost = 0 // what decoding it cost, which is not sent
		assert.Equal(t, &got, msg, "decoded %+v, want %+v", got, *msg)
	}
}

// The messages that go through gob carry no map: gob sizes a map it
// decodes by the entry count the message claims, before it reads one (a
// message of a hundred bytes could claim four billion entries). (What the
// parent reads from its child encodes itself: see wire.go.)
func TestGobMessagesHaveNoMaps(t *testing.T) {
	for _, v := range []any{new(hello), new(ready), new(requestHead), new(responseHead), new(bodyEnd)} {
		if _, ok := v.(wireMessage); ok {
			continue
		}
		maps := 0
		var walk func(reflect.Type)
		walk = func(typ reflect.Type) {
			switch typ.Kind() {
			case reflect.Map:
				maps++
			case reflect.Pointer, reflect.Slice:
				walk(typ.Elem())
			case reflect.Struct:
				for i := range typ.NumField() {
					walk(typ.Field(i).Type)
				}
			}
		}
		walk(reflect.TypeOf(v).Elem())
		assert.Zero(t, maps, "%T, which gob decodes, has a map", v)
	}
}

// A module whose init exited with status 0 made Start say "the child exited
// before it was ready (<nil>)"; one whose init closed the protocol pipe and
// lived on was reported as exited ("signal: killed"), although it was the
// parent that killed it once the pipe had closed.
func TestStartErrorSaysHowTheChildEnded(t *testing.T) {
	for _, tt := range []struct{ mode, want string }{
		{"exit0", "the child exited before it was ready (exit status 0)"},
		{"close", "the child's protocol pipe (its stdout) closed before it was ready; the child ended with signal: killed"},
	} {
		dir := t.TempDir()
		cfg := fmt.Sprintf(`{"Dir":%q,"InitMode":%q}`, dir, tt.mode)
		h, err := Start(context.Background(), "chaos-init", Options{Config: []byte(cfg), Stderr: io.Discard, Logger: discardLogger()})
		if err == nil {
			h.Close()
			t.Fatalf("%s: Start succeeded", tt.mode)
		}
		assert.Contains(t, err.Error(), tt.want, "%s: Start's error %q does not say %q", tt.mode, err, tt.want)
	}
}
