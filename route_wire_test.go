package subproc

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The pattern and path values round-trip in the request head, cost
// nothing on the wire when there are none, and a malformed encoding of
// them is an error.
func TestHeadPathValues(t *testing.T) {
	in := &requestHead{Method: "GET", Path: "/pv/1/a", Pattern: "GET /pv/{id}/{rest...}", PathValues: []string{"id", "1", "rest", "a"}}
	p := in.appendWire(nil)
	var out requestHead
	require.NoError(t, out.decodeWire(p))
	assert.Equal(t, in, &out, "round trip:\n got %+v\nwant %+v", out, *in)
	for n := range len(p) {
		assert.Error(t, new(requestHead).decodeWire(p[:n]), "truncated to %d of %d bytes: no error", n, len(p))
	}
	assert.GreaterOrEqual(t, in.wireSize(), len(p), "wireSize below the encoding's size")

	plain := (&requestHead{Method: "GET", Path: "/"}).appendWire(nil)
	head := newRequestHead(httptest.NewRequest("GET", "/", nil))
	assert.Empty(t, head.Pattern, "a request that matched no pattern: Pattern")
	assert.Nil(t, head.PathValues, "a request that matched no pattern: PathValues")
	for _, bad := range []*requestHead{
		{Method: "GET", Path: "/", Pattern: "/x", PathValues: []string{"odd"}},
		{Method: "GET", Path: "/", Pattern: "/x", PathValues: []string{"a", "1", "b"}},
	} {
		p := bad.appendWire(nil)
		assert.Error(t, new(requestHead).decodeWire(p), "PathValues %q: no error", bad.PathValues)
	}
	// The flag, with an empty pattern. plain is the version, the flags
	// (0, one byte) and the rest; headPattern's flags take two bytes.
	require.Zero(t, plain[1], "test out of date: flags %#x, headPattern %#x", plain[1], headPattern)
	require.Equal(t, 0x100, headPattern, "test out of date: flags %#x, headPattern %#x", plain[1], headPattern)
	flagged := slices.Concat(plain[:1], []byte{0x80, 0x02}, plain[2:], []byte{0, 0}) // empty Pattern, no PathValues
	assert.Error(t, new(requestHead).decodeWire(flagged), "an announced Pattern that is empty: no error")
	flagged[len(flagged)-2] = 1 // Pattern "\x00"
	flagged = append(flagged[:len(flagged)-1], 0, 0)
	assert.NoError(t, new(requestHead).decodeWire(flagged), "the same with a pattern")
}

func TestPatternWildcards(t *testing.T) {
	for _, tt := range []struct {
		pattern string
		want    []string
	}{
		{"/", nil},
		{"GET /x/{id}", []string{"id"}},
		{"GET example.com/x/{id}/{rest...}", []string{"id", "rest"}},
		{"/a/{x}/b/{y}/{$}", []string{"x", "y"}},
		{"/files/", nil},
		{"POST\t/{a}/{b...}", []string{"a", "b"}},
		{"/{}/{...}/lit{x}", nil},
		{"no slash", nil},
	} {
		got := slices.Collect(patternWildcards(tt.pattern))
		assert.True(t, slices.Equal(got, tt.want), "patternWildcards(%q) = %q, want %q", tt.pattern, got, tt.want)
	}
}

// pathValues lists what the parent's ServeMux set.
func TestPathValuesOfRequest(t *testing.T) {
	var pattern string
	var values []string
	mux := http.NewServeMux()
	mux.HandleFunc("GET /pv/{id}/{rest...}", func(w http.ResponseWriter, r *http.Request) {
		r.SetPathValue("id", "changed") // as a middleware may
		pattern, values = pathValues(r)
	})
	mux.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/pv/1/a%2Fb/c", nil))
	assert.Equal(t, "GET /pv/{id}/{rest...}", pattern, "pathValues: pattern")
	assert.Equal(t, []string{"id", "changed", "rest", "a/b/c"}, values, "pathValues: values")
}
