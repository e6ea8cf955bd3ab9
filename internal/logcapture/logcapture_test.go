package logcapture

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// newCapture returns a Capture closed at the end of the test.
func newCapture(t *testing.T, opts Options) *Capture {
	t.Helper()
	c, err := New(opts)
	if err != nil {
		t.Fatalf("New(%+v): %v", opts, err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c
}

func copyString(t *testing.T, c *Capture, s Stream, text string) {
	t.Helper()
	if err := c.Copy(s, strings.NewReader(text)); err != nil {
		t.Fatalf("Copy(%v): %v", s, err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// lineWriter records what is written to it and fails the test unless each
// Write is exactly one line. It is not safe for concurrent use, so that the
// race detector checks that Captures serialize their writes.
type lineWriter struct {
	t   *testing.T
	buf bytes.Buffer
}

func (w *lineWriter) Write(p []byte) (int, error) {
	if i := bytes.IndexByte(p, '\n'); i != len(p)-1 {
		w.t.Errorf("Write(%.40q...) of %d bytes is not one line", p, len(p))
	}
	return w.buf.Write(p)
}

func TestStreamString(t *testing.T) {
	for s, want := range map[Stream]string{Log: "log", Out: "out", Err: "err", 3: "Stream(3)", -1: "Stream(-1)"} {
		if got := s.String(); got != want {
			t.Errorf("Stream(%d).String() = %q, want %q", int(s), got, want)
		}
	}
}

func TestNewErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	uncreatable := filepath.Join(file, "logs")

	tests := []struct {
		name string
		opts Options
		want []string // substrings of the error
	}{
		{"empty name", Options{}, []string{"empty module name"}},
		{"negative MaxSize", Options{Name: "m", MaxSize: -1}, []string{`"m"`, "negative"}},
		{"negative MaxBackups", Options{Name: "m", MaxBackups: -1}, []string{`"m"`, "negative"}},
		{"negative TailLines", Options{Name: "m", TailLines: -1}, []string{`"m"`, "negative"}},
		{"name with separator", Options{Name: "a/b", Dir: t.TempDir()}, []string{`"a/b"`, "file name"}},
		{"uncreatable dir", Options{Name: "web", Dir: uncreatable}, []string{`"web"`, uncreatable, "not a directory"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(tt.opts)
			if err == nil {
				c.Close()
				t.Fatalf("New(%+v) succeeded, want an error", tt.opts)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("New(%+v) = %q, want it to contain %q", tt.opts, err, w)
				}
			}
		})
	}
}

func TestNewCreatesDirAndFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	newCapture(t, Options{Name: "m", Dir: dir})
	for _, name := range []string{"m.log", "m.out", "m.err"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("after New: %v", err)
		}
	}
}

func TestCopyFile(t *testing.T) {
	// Each test Copies the inputs in turn, as successive incarnations do.
	tests := []struct {
		name   string
		inputs []string
		want   string
	}{
		{"one line", []string{"a\n"}, "a\n"},
		{"lines", []string{"a\nb\n\nc\n"}, "a\nb\n\nc\n"},
		{"incarnations append", []string{"a\nb\n", "c\n"}, "a\nb\nc\n"},
		{"final line ended", []string{"a\nb"}, "a\nb\n"},
		{"empty", []string{"", ""}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, s := range []Stream{Log, Out, Err} {
				dir := t.TempDir()
				c := newCapture(t, Options{Name: "m", Dir: dir})
				for _, in := range tt.inputs {
					copyString(t, c, s, in)
				}
				for _, other := range []Stream{Log, Out, Err} {
					want := ""
					if other == s {
						want = tt.want
					}
					if got := readFile(t, filepath.Join(dir, "m."+other.String())); got != want {
						t.Errorf("after Copy(%v): m.%v holds %q, want %q", s, other, got, want)
					}
				}
			}
		})
	}
}

func TestCopyFileAcrossCaptures(t *testing.T) {
	dir := t.TempDir()
	for _, in := range []string{"first\n", "second\n"} {
		c, err := New(Options{Name: "m", Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		copyString(t, c, Out, in)
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := readFile(t, filepath.Join(dir, "m.out")), "first\nsecond\n"; got != want {
		t.Errorf("m.out holds %q, want %q", got, want)
	}
}

func TestCopyPrefix(t *testing.T) {
	tests := []struct {
		name   string
		inputs []string
		want   string
	}{
		{"one line", []string{"a\n"}, "[m] a\n"},
		{"lines", []string{"a\nb\n\nc\n"}, "[m] a\n[m] b\n[m] \n[m] c\n"},
		{"incarnations append", []string{"a\n", "b\n"}, "[m] a\n[m] b\n"},
		{"final line gets newline", []string{"a\nb", "c"}, "[m] a\n[m] b\n[m] c\n"},
		{"empty", []string{""}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, s := range []Stream{Log, Out, Err} {
				w := &lineWriter{t: t}
				c := newCapture(t, Options{Name: "m", Stderr: w})
				for _, in := range tt.inputs {
					copyString(t, c, s, in)
				}
				if got := w.buf.String(); got != tt.want {
					t.Errorf("Copy(%v) wrote %q, want %q", s, got, tt.want)
				}
			}
		})
	}
}

// TestCopyLongLine checks that a line longer than maxLine is copied in
// pieces: unchanged in a file, as separate prefixed lines otherwise.
func TestCopyLongLine(t *testing.T) {
	long := strings.Repeat("x", 2*maxLine+10)
	in := "short\n" + long + "\nend"

	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		c := newCapture(t, Options{Name: "m", Dir: dir})
		copyString(t, c, Err, in)
		if got := readFile(t, filepath.Join(dir, "m.err")); got != in+"\n" {
			t.Errorf("m.err holds %d bytes, want the %d bytes copied and a newline", len(got), len(in))
		}
	})
	t.Run("prefix", func(t *testing.T) {
		w := &lineWriter{t: t}
		c := newCapture(t, Options{Name: "m", Stderr: w})
		copyString(t, c, Err, in)
		piece := strings.Repeat("x", maxLine)
		want := "[m] short\n[m] " + piece + "\n[m] " + piece + "\n[m] xxxxxxxxxx\n[m] end\n"
		if got := w.buf.String(); got != want {
			t.Errorf("wrote %d bytes, want %d: lines of lengths %v", len(got), len(want), lineLengths(got))
		}
	})
}

func lineLengths(s string) []int {
	var n []int
	for line := range strings.Lines(s) {
		n = append(n, len(line))
	}
	return n
}

// genLines returns n lines of varying length identifying stream s and
// incarnation inc, in an order checkLines verifies.
func genLines(s Stream, inc, n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%v %d %d %s\n", s, inc, i, strings.Repeat("=", i%97))
	}
	return b.String()
}

// checkLines checks that text consists of whole lines made by genLines,
// each after prefix, in order within each stream and incarnation, and
// returns how many lines of each it found.
func checkLines(t *testing.T, text, prefix string) map[string]int {
	t.Helper()
	next := make(map[string]int)
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			t.Fatalf("line %q lacks prefix %q", line, prefix)
		}
		fields := strings.Fields(rest)
		if len(fields) < 3 {
			t.Fatalf("line %q is garbled", line)
		}
		key := fields[0] + " " + fields[1]
		i := next[key]
		if want := fmt.Sprintf("%s%s %d %s\n", prefix, key, i, strings.Repeat("=", i%97)); line != want {
			t.Fatalf("line %q, want %q", line, want)
		}
		next[key]++
	}
	return next
}

// TestCopyConcurrent copies three streams, two incarnations each, at once,
// through readers returning a few bytes at a time, and checks that no line
// is interleaved with another.
func TestCopyConcurrent(t *testing.T) {
	const n = 500
	run := func(c *Capture) {
		var wg sync.WaitGroup
		errc := make(chan error, 6)
		for _, s := range []Stream{Log, Out, Err} {
			for inc := range 2 {
				wg.Go(func() {
					errc <- c.Copy(s, iotest.HalfReader(strings.NewReader(genLines(s, inc, n))))
				})
			}
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			if err != nil {
				t.Errorf("Copy: %v", err)
			}
		}
	}

	t.Run("prefix", func(t *testing.T) {
		w := &lineWriter{t: t}
		c := newCapture(t, Options{Name: "m", Stderr: w})
		run(c)
		got := checkLines(t, w.buf.String(), "[m] ")
		if len(got) != 6 {
			t.Errorf("found lines of %d stream incarnations, want 6: %v", len(got), got)
		}
		for key, count := range got {
			if count != n {
				t.Errorf("found %d lines of %s, want %d", count, key, n)
			}
		}
	})
	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		c := newCapture(t, Options{Name: "m", Dir: dir})
		run(c)
		for _, s := range []Stream{Log, Out, Err} {
			got := checkLines(t, readFile(t, filepath.Join(dir, "m."+s.String())), "")
			want := map[string]int{s.String() + " 0": n, s.String() + " 1": n}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("m.%v holds lines %v, want %v", s, got, want)
			}
		}
	})
}

func TestTail(t *testing.T) {
	tests := []struct {
		name      string
		tailLines int
		copies    []string // "<stream>:<input>"
		want      []string
	}{
		{"nothing", 3, nil, []string{}},
		{"fewer than kept", 3, []string{"log:a\n", "err:panic: boom\n"}, []string{"log: a", "err: panic: boom"}},
		{"ring wraps", 3, []string{"out:1\n2\n", "err:3\n", "log:4\n5\n"}, []string{"err: 3", "log: 4", "log: 5"}},
		{"exactly full", 2, []string{"out:1\n2\n"}, []string{"out: 1", "out: 2"}},
		{"final line without newline", 2, []string{"err:a\nb"}, []string{"err: a", "err: b"}},
		{"empty line", 2, []string{"out:\n"}, []string{"out: "}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCapture(t, Options{Name: "m", Stderr: io.Discard, TailLines: tt.tailLines})
			for _, cp := range tt.copies {
				name, in, _ := strings.Cut(cp, ":")
				s := map[string]Stream{"log": Log, "out": Out, "err": Err}[name]
				copyString(t, c, s, in)
			}
			if got := c.Tail(); !slices.Equal(got, tt.want) || got == nil {
				t.Errorf("Tail() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTailDefault(t *testing.T) {
	c := newCapture(t, Options{Name: "m", Dir: t.TempDir()})
	var in strings.Builder
	var want []string
	for i := range 50 {
		fmt.Fprintf(&in, "line %d\n", i)
		if i >= 50-defaultTailLines {
			want = append(want, fmt.Sprintf("out: line %d", i))
		}
	}
	copyString(t, c, Out, in.String())
	if got := c.Tail(); !slices.Equal(got, want) {
		t.Errorf("Tail() = %q, want %q", got, want)
	}
}

func TestRotation(t *testing.T) {
	dir := t.TempDir()
	c := newCapture(t, Options{Name: "m", Dir: dir, MaxSize: 1})
	line := strings.Repeat("r", 999) + "\n"
	const lines = 1500 // 1.5 MB
	copyString(t, c, Err, strings.Repeat(line, lines))

	backups, err := filepath.Glob(filepath.Join(dir, "m-*.err"))
	if err != nil {
		t.Fatal(err)
	}
	if len(backups) != 1 {
		t.Fatalf("found backups %q, want one", backups)
	}
	total := 0
	for _, path := range append(backups, filepath.Join(dir, "m.err")) {
		text := readFile(t, path)
		if len(text) > 1<<20 {
			t.Errorf("%s holds %d bytes, more than MaxSize", path, len(text))
		}
		if strings.Count(text, line)*len(line) != len(text) {
			t.Errorf("%s does not hold whole lines", path)
		}
		total += len(text)
	}
	if total != lines*len(line) {
		t.Errorf("files hold %d bytes, want %d", total, lines*len(line))
	}
}

func TestRegistry(t *testing.T) {
	dir := t.TempDir()
	c1 := newCapture(t, Options{Name: "m", Dir: dir, MaxSize: 5, MaxBackups: 2})
	c2 := newCapture(t, Options{Name: "m", Dir: dir, MaxSize: 7, MaxBackups: 3})
	other := newCapture(t, Options{Name: "other", Dir: dir})

	users := func(f *sharedFile) int {
		registry.mu.Lock()
		defer registry.mu.Unlock()
		return f.users
	}
	for s := range c1.files {
		f := c1.files[s]
		if c2.files[s] != f {
			t.Errorf("%v: two Captures for one path have different files", Stream(s))
		}
		if other.files[s] == f {
			t.Errorf("%v: Captures for different paths share a file", Stream(s))
		}
		if f.rf.maxSize != 5*megabyte || f.rf.maxBackups != 2 {
			t.Errorf("%v: maxSize, maxBackups = %d, %d; want the first Capture's 5 MB, 2", Stream(s), f.rf.maxSize, f.rf.maxBackups)
		}
		if n := users(f); n != 2 {
			t.Errorf("%v: %d users, want 2", Stream(s), n)
		}
	}

	realDir, err := filepath.EvalSymlinks(dir) // as /proc/self/fd shows it
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(realDir, "m.log")
	copyString(t, c1, Log, "one\n")
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	if n := users(c2.files[Log]); n != 1 {
		t.Errorf("after one Close: %d users, want 1", n)
	}
	if !isOpen(t, logPath) {
		t.Error("after one Close: m.log is closed, want it open for the other Capture")
	}
	copyString(t, c2, Log, "two\n")
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
	if n := users(c2.files[Log]); n != 0 {
		t.Errorf("after both Close: %d users, want 0", n)
	}
	if isOpen(t, logPath) {
		t.Error("after both Close: m.log is still open")
	}
	registry.mu.Lock()
	_, kept := registry.files[c1.files[Log].path]
	registry.mu.Unlock()
	if kept {
		t.Error("after both Close: the registry still holds m.log")
	}

	c3 := newCapture(t, Options{Name: "m", Dir: dir + "/.", MaxSize: 9})
	if c3.files[Log] == c1.files[Log] {
		t.Error("a Capture made after the others closed has their file, want a new one")
	}
	if got := c3.files[Log].rf.maxSize; got != 9*megabyte {
		t.Errorf("a Capture made after the others closed has maxSize %d, want its own 9 MB", got)
	}
	copyString(t, c3, Log, "three\n")
	if got, want := readFile(t, filepath.Join(dir, "m.log")), "one\ntwo\nthree\n"; got != want {
		t.Errorf("m.log holds %q, want %q", got, want)
	}
}

// isOpen reports whether the process has a file descriptor open on path.
func isOpen(t *testing.T, path string) bool {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list open files: %v", err)
	}
	for _, fd := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && target == path {
			return true
		}
	}
	return false
}

func TestClose(t *testing.T) {
	for _, dir := range []string{"", t.TempDir()} {
		c, err := New(Options{Name: "m", Dir: dir, Stderr: io.Discard})
		if err != nil {
			t.Fatal(err)
		}
		copyString(t, c, Out, "before\n")
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := c.Copy(Out, strings.NewReader("after\n")); err != ErrClosed {
			t.Errorf("Copy after Close = %v, want ErrClosed", err)
		}
		if got, want := c.Tail(), []string{"out: before", "out: after"}; !slices.Equal(got, want) {
			t.Errorf("Tail() = %q, want %q", got, want)
		}
		if dir != "" {
			if got := readFile(t, filepath.Join(dir, "m.out")); got != "before\n" {
				t.Errorf("m.out holds %q, want %q", got, "before\n")
			}
		}
	}
}

// failWriter fails every Write.
type failWriter struct{ err error }

func (w failWriter) Write(p []byte) (int, error) { return 0, w.err }

func TestCopyErrors(t *testing.T) {
	t.Run("write error drains r", func(t *testing.T) {
		errWrite := errors.New("disk full")
		c := newCapture(t, Options{Name: "m", Stderr: failWriter{errWrite}})
		r := strings.NewReader("a\nb\nc\n")
		err := c.Copy(Err, r)
		if !errors.Is(err, errWrite) || !strings.Contains(err.Error(), `"m"`) {
			t.Errorf("Copy = %v, want an error naming the module, wrapping %v", err, errWrite)
		}
		if r.Len() != 0 {
			t.Errorf("Copy left %d bytes unread", r.Len())
		}
		if got, want := c.Tail(), []string{"err: a", "err: b", "err: c"}; !slices.Equal(got, want) {
			t.Errorf("Tail() = %q, want %q", got, want)
		}
	})
	t.Run("read error", func(t *testing.T) {
		errRead := errors.New("pipe broke")
		w := &lineWriter{t: t}
		c := newCapture(t, Options{Name: "m", Stderr: w})
		err := c.Copy(Out, io.MultiReader(strings.NewReader("a\nb"), iotest.ErrReader(errRead)))
		if !errors.Is(err, errRead) || !strings.Contains(err.Error(), `"m"`) {
			t.Errorf("Copy = %v, want an error naming the module, wrapping %v", err, errRead)
		}
		if got, want := w.buf.String(), "[m] a\n[m] b\n"; got != want {
			t.Errorf("wrote %q, want %q", got, want)
		}
	})
	t.Run("invalid stream", func(t *testing.T) {
		c := newCapture(t, Options{Name: "m", Stderr: io.Discard})
		if err := c.Copy(Stream(7), strings.NewReader("a\n")); err == nil {
			t.Error("Copy(Stream(7)) succeeded")
		}
	})
}

// TestPrefixWritesSerialized checks that two Captures sharing a writer
// never write to it at once (the race detector and lineWriter check).
func TestPrefixWritesSerialized(t *testing.T) {
	w := &lineWriter{t: t}
	a := newCapture(t, Options{Name: "a", Stderr: w})
	b := newCapture(t, Options{Name: "b", Stderr: w})
	var wg sync.WaitGroup
	for _, c := range []*Capture{a, b} {
		wg.Go(func() { c.Copy(Out, iotest.HalfReader(strings.NewReader(genLines(Out, 0, 300)))) })
	}
	wg.Wait()
	var fromA, fromB strings.Builder
	for line := range strings.Lines(w.buf.String()) {
		switch {
		case strings.HasPrefix(line, "[a] "):
			fromA.WriteString(line)
		case strings.HasPrefix(line, "[b] "):
			fromB.WriteString(line)
		default:
			t.Fatalf("line %q has no module prefix", line)
		}
	}
	for prefix, text := range map[string]string{"[a] ": fromA.String(), "[b] ": fromB.String()} {
		if got := checkLines(t, text, prefix); got["out 0"] != 300 {
			t.Errorf("%s: found %v lines, want 300", prefix, got)
		}
	}
}

// TestResetTail checks that Tail reports only lines read after ResetTail.
func TestResetTail(t *testing.T) {
	c := newCapture(t, Options{Name: "m", Stderr: io.Discard, TailLines: 3})
	copyString(t, c, Err, "a\nb\nc\nd\n")
	c.ResetTail()
	if got := c.Tail(); len(got) != 0 {
		t.Fatalf("Tail after ResetTail = %q, want nothing", got)
	}
	copyString(t, c, Out, "e\n")
	if got := c.Tail(); len(got) != 1 || got[0] != "out: e" {
		t.Fatalf("Tail = %q, want [out: e]", got)
	}
}
