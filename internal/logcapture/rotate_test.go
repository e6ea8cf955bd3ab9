package logcapture

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// fakeClock is a clock that moves only when told to. Its methods are safe
// for concurrent use.
type fakeClock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 6e6, time.UTC)}
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// dirFiles returns the names of the files in dir and their contents.
func dirFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string]string)
	for _, e := range entries {
		files[e.Name()] = readFile(t, filepath.Join(dir, e.Name()))
	}
	return files
}

// TestRotatingFile writes numbered 8-byte lines to a rotatingFile of 20
// bytes, so that each file holds two lines, and checks every file left.
func TestRotatingFile(t *testing.T) {
	const second = "2030-01-02T03-04-05.006" // the fake clock's time, as in names
	tests := []struct {
		name       string
		maxBackups int
		lines      int           // "line 00\n", "line 01\n", ...
		tick       time.Duration // how far the clock moves after each line
		before     map[string]string
		want       map[string]string // the directory's files afterwards
	}{{
		name: "no rotation", lines: 2,
		want: map[string]string{"m.err": "line 00\nline 01\n"},
	}, {
		name: "keep all", lines: 7, tick: time.Second,
		want: map[string]string{
			"m-2030-01-02T03-04-07.006.err": "line 00\nline 01\n",
			"m-2030-01-02T03-04-09.006.err": "line 02\nline 03\n",
			"m-2030-01-02T03-04-11.006.err": "line 04\nline 05\n",
			"m.err":                         "line 06\n",
		},
	}, {
		name: "prune", maxBackups: 2, lines: 8, tick: time.Second,
		want: map[string]string{
			"m-2030-01-02T03-04-09.006.err": "line 02\nline 03\n",
			"m-2030-01-02T03-04-11.006.err": "line 04\nline 05\n",
			"m.err":                         "line 06\nline 07\n",
		},
	}, {
		name: "same millisecond", maxBackups: 2, lines: 8,
		want: map[string]string{
			"m-" + second + "-1.err": "line 02\nline 03\n",
			"m-" + second + "-2.err": "line 04\nline 05\n",
			"m.err":                  "line 06\nline 07\n",
		},
	}, {
		// Old backups (such as lumberjack's, named alike) are pruned
		// first; files that are not backups of m.err are left alone.
		name: "others' files", maxBackups: 1, lines: 4,
		before: map[string]string{
			"m-2000-01-01T00-00-00.000.err":      "old\n",
			"m-notes.err":                        "notes\n",
			"m-2000-01-01T00-00-00.000.out":      "out\n",
			"m-x-2000-01-01T00-00-00.000.err":    "module m-x\n",
			"m-2000-01-01T00-00-00.000-zero.err": "not a backup\n",
		},
		want: map[string]string{
			"m-" + second + ".err":               "line 00\nline 01\n",
			"m-notes.err":                        "notes\n",
			"m-2000-01-01T00-00-00.000.out":      "out\n",
			"m-x-2000-01-01T00-00-00.000.err":    "module m-x\n",
			"m-2000-01-01T00-00-00.000-zero.err": "not a backup\n",
			"m.err":                              "line 02\nline 03\n",
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, text := range tt.before {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			clock := newFakeClock()
			r := newRotatingFile(filepath.Join(dir, "m.err"), 20, tt.maxBackups, nil, clock.now)
			for i := range tt.lines {
				line := fmt.Sprintf("line %02d\n", i)
				if n, err := r.Write([]byte(line)); n != len(line) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", line, n, err)
				}
				clock.advance(tt.tick)
			}
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			if got := dirFiles(t, dir); fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("files:\n%v\nwant:\n%v", got, tt.want)
			}
		})
	}
}

// TestRotatingFileLongWrite checks that a write longer than maxSize goes
// whole into a file of its own.
func TestRotatingFileLongWrite(t *testing.T) {
	dir := t.TempDir()
	r := newRotatingFile(filepath.Join(dir, "m.log"), 10, 0, nil, newFakeClock().now)
	defer r.Close()
	long := strings.Repeat("L", 25) + "\n"
	for _, s := range []string{"a\n", long, "b\n"} {
		if _, err := r.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for _, text := range dirFiles(t, dir) {
		got = append(got, text)
	}
	slices.Sort(got)
	if want := []string{long, "a\n", "b\n"}; !slices.Equal(got, want) {
		t.Errorf("files hold %q, want %q", got, want)
	}
}

// TestRotationConcurrent writes from several goroutines through Captures
// sharing one file that rotates, and checks that no line is lost or torn.
func TestRotationConcurrent(t *testing.T) {
	dir := t.TempDir()
	const writers, n = 4, 3000
	line := strings.Repeat("c", 599) + "\n" // 4 writers × 3000 × 600 B: 7.2 MB, 7 rotations
	var wg sync.WaitGroup
	for range writers {
		c := newCapture(t, Options{Name: "m", Dir: dir, MaxSize: 1})
		wg.Go(func() { copyString(t, c, Out, strings.Repeat(line, n)) })
	}
	wg.Wait()
	total := 0
	for name, text := range dirFiles(t, dir) {
		if !strings.HasSuffix(name, ".out") {
			continue
		}
		if len(text) > megabyte {
			t.Errorf("%s holds %d bytes, more than MaxSize", name, len(text))
		}
		if strings.Count(text, line)*len(line) != len(text) {
			t.Errorf("%s does not hold whole lines", name)
		}
		total += len(text)
	}
	if want := writers * n * len(line); total != want {
		t.Errorf("files hold %d bytes, want %d", total, want)
	}
}

// TestCapturesLeaveNoGoroutine checks that Captures for many distinct
// directories leave no goroutine and no registry entry behind once closed
// (lumberjack left a goroutine per file for the life of the process).
func TestCapturesLeaveNoGoroutine(t *testing.T) {
	before := goleak.IgnoreCurrent()
	root := t.TempDir()
	for i := range 200 {
		c, err := New(Options{Name: "m", Dir: filepath.Join(root, fmt.Sprint(i)), MaxSize: 1, MaxBackups: 1})
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []Stream{Log, Out, Err} {
			copyString(t, c, s, "a line\n")
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	goleak.VerifyNone(t, before)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if n := len(registry.files); n != 0 {
		t.Errorf("the registry holds %d files after every Capture closed, want 0", n)
	}
}
