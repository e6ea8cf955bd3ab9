package logcapture

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// controlLines are lines a module could write to forge or hide output on
// the operator's terminal, and how prefix mode must show them.
var controlLines = []struct {
	name, in, want string
}{
	{"plain", "listening on :8080\n", `[m] listening on :8080`},
	{"carriage return", "\r[other] forged\n", `[m] \r[other] forged`},
	{"ANSI escapes", "\x1b[1A\x1b[2K[other] forged\n", `[m] \x1b[1A\x1b[2K[other] forged`},
	{"tab kept", "a\tb\n", "[m] a\tb"},
	{"named C0", "\a\b\f\v\x00\x01\x1f\n", `[m] \a\b\f\v\x00\x01\x1f`},
	{"DEL", "x\x7f\n", `[m] x\x7f`},
	{"C1 controls", "\u0085 \u009b31m \u0080\n", `[m] \u0085 \u009b31m \u0080`},
	{"invalid UTF-8", "bad \xff\xfe \xc3 end\n", `[m] bad \xff\xfe \xc3 end`},
	{"valid UTF-8 kept", "héllo 世界 \uFFFD \u00a0\n", "[m] héllo 世界 \uFFFD \u00a0"},
	{"backslash kept", `C:\dir\x1b` + "\n", `[m] C:\dir\x1b`},
	{"no final newline", "a\rb", `[m] a\rb`},
}

// TestCopyPrefixEscapes checks that prefix mode escapes control
// characters, so that each line of a module's stays one line of its own.
func TestCopyPrefixEscapes(t *testing.T) {
	for _, tt := range controlLines {
		t.Run(tt.name, func(t *testing.T) {
			w := &lineWriter{t: t}
			c := newCapture(t, Options{Name: "m", Stderr: w})
			copyString(t, c, Err, tt.in)
			if got := w.buf.String(); got != tt.want+"\n" {
				t.Errorf("Copy(%q) wrote %q, want %q", tt.in, got, tt.want+"\n")
			}
		})
	}
}

// TestCopyFileKeepsControls checks that files receive a module's bytes
// exactly, control characters included.
func TestCopyFileKeepsControls(t *testing.T) {
	var in strings.Builder
	for _, tt := range controlLines {
		in.WriteString(tt.in)
		if !strings.HasSuffix(tt.in, "\n") {
			in.WriteString("\n")
		}
	}
	dir := t.TempDir()
	c := newCapture(t, Options{Name: "m", Dir: dir})
	copyString(t, c, Out, in.String())
	if got := readFile(t, filepath.Join(dir, "m.out")); got != in.String() {
		t.Errorf("m.out holds %q, want %q", got, in.String())
	}
}

// FuzzAppendEscaped checks that no input leaves a control character, or
// invalid UTF-8, in what prefix mode writes.
func FuzzAppendEscaped(f *testing.F) {
	for _, tt := range controlLines {
		f.Add([]byte(tt.in))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out := appendEscaped(nil, in)
		if !utf8.Valid(out) {
			t.Fatalf("appendEscaped(%q) = %q, invalid UTF-8", in, out)
		}
		for _, r := range string(out) {
			if r < 0x20 && r != '\t' || r >= 0x7f && r <= 0x9f {
				t.Fatalf("appendEscaped(%q) = %q, holding %U", in, out, r)
			}
		}
	})
}

func TestTailEscapes(t *testing.T) {
	c, err := New(Options{Name: "m", Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Copy(Err, strings.NewReader("a\x1b[2Kb\rc\n")); err != nil {
		t.Fatal(err)
	}
	if got, want := c.Tail(), []string{`err: a\x1b[2Kb\rc`}; !slices.Equal(got, want) {
		t.Errorf("Tail() = %q, want %q", got, want)
	}
}
