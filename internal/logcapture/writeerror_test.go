package logcapture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/iotest"
)

// A fullDisk stands in for a file system that runs out of space: while full
// is set, writes to the files it opens fail with ENOSPC, after writing
// partial bytes of each if partial is set.
type fullDisk struct {
	full    atomic.Bool
	partial atomic.Int64
	opens   atomic.Int64 // files opened
}

// open is the seam for Options.openFile.
func (d *fullDisk) open(path string) (file, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	d.opens.Add(1)
	return &fullFile{File: f, disk: d}, nil
}

// Write implements io.Writer for prefix mode.
func (d *fullDisk) Write(p []byte) (int, error) {
	if d.full.Load() {
		return 0, syscall.ENOSPC
	}
	return len(p), nil
}

type fullFile struct {
	*os.File
	disk *fullDisk
}

func (f *fullFile) Write(p []byte) (int, error) {
	if !f.disk.full.Load() {
		return f.File.Write(p)
	}
	n, _ := f.File.Write(p[:min(len(p), int(f.disk.partial.Load()))])
	return n, &fs.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
}

// A report is one call of Options.OnWriteError.
type report struct {
	s    Stream
	err  error
	lost int
}

func (r report) String() string {
	if r.err == nil {
		return fmt.Sprintf("%v resumed, %d lost", r.s, r.lost)
	}
	return fmt.Sprintf("%v failing (%v), %d lost", r.s, errors.Is(r.err, syscall.ENOSPC), r.lost)
}

// reports records the calls of Options.OnWriteError.
type reports struct {
	mu   sync.Mutex // guards list
	list []string
}

func (r *reports) add(s Stream, err error, lost int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, report{s, err, lost}.String())
}

// take returns the reports since the last call.
func (r *reports) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := r.list
	r.list = nil
	return list
}

// TestWriteErrors fills and frees a disk (and, in prefix mode, breaks and
// mends Stderr) under a Capture, and checks that it reads on, reports the
// lines lost at once and then at most once per reportInterval, reports
// recovery, and resumes writing.
func TestWriteErrors(t *testing.T) {
	for _, mode := range []string{"file", "prefix"} {
		t.Run(mode, func(t *testing.T) {
			disk := &fullDisk{}
			clock := newFakeClock()
			var got reports
			dir := t.TempDir()
			opts := Options{Name: "m", OnWriteError: got.add, openFile: disk.open, now: clock.now}
			if mode == "file" {
				opts.Dir = dir
			} else {
				opts.Stderr = disk
			}
			c := newCapture(t, opts)

			steps := []struct {
				full    bool
				advance bool // move the clock by reportInterval first
				in      string
				want    []string
			}{
				{false, false, "a\n", nil},
				{true, false, "b\nc\nd\n", []string{"err failing (true), 1 lost"}},
				{true, false, "e\n", nil},
				{true, true, "f\ng\n", []string{"err failing (true), 4 lost"}},
				{true, false, "h\n", nil},
				{false, false, "i\nj\n", []string{"err resumed, 7 lost"}},
				{false, true, "k\n", nil},
				{true, false, "l\n", []string{"err failing (true), 1 lost"}},
				{false, false, "m\n", []string{"err resumed, 1 lost"}},
			}
			for i, st := range steps {
				disk.full.Store(st.full)
				if st.advance {
					clock.advance(reportInterval)
				}
				r := strings.NewReader(st.in)
				err := c.Copy(Err, r)
				if st.full != (err != nil) {
					t.Errorf("step %d: Copy(%q) = %v, want an error %v", i, st.in, err, st.full)
				}
				if err != nil && (!errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), `"m"`)) {
					t.Errorf("step %d: Copy = %v, want an error naming the module, wrapping ENOSPC", i, err)
				}
				if r.Len() != 0 {
					t.Errorf("step %d: Copy left %d bytes unread", i, r.Len())
				}
				if g := got.take(); fmt.Sprint(g) != fmt.Sprint(st.want) {
					t.Errorf("step %d: after Copy(%q) with the disk full %v, reports %q, want %q", i, st.in, st.full, g, st.want)
				}
			}
			if mode == "file" {
				if got, want := readFile(t, filepath.Join(dir, "m.err")), "a\ni\nj\nk\nm\n"; got != want {
					t.Errorf("m.err holds %q, want %q", got, want)
				}
				if n := disk.opens.Load(); n < 4 {
					t.Errorf("m.log, m.out, m.err opened %d times in all, want m.err reopened after its failures", n)
				}
			}
		})
	}
}

// TestWriteErrorStreams checks that failures are counted per stream: one
// stream failing does not report another, nor another's recovery.
func TestWriteErrorStreams(t *testing.T) {
	disk := &fullDisk{}
	var got reports
	c := newCapture(t, Options{Name: "m", Dir: t.TempDir(), OnWriteError: got.add, openFile: disk.open, now: newFakeClock().now})
	disk.full.Store(true)
	c.Copy(Err, strings.NewReader("a\n"))
	c.Copy(Log, strings.NewReader("b\nc\n"))
	disk.full.Store(false)
	copyString(t, c, Log, "d\n")
	copyString(t, c, Out, "e\n")
	want := []string{"err failing (true), 1 lost", "log failing (true), 1 lost", "log resumed, 2 lost"}
	if g := got.take(); fmt.Sprint(g) != fmt.Sprint(want) {
		t.Errorf("reports %q, want %q", g, want)
	}
}

// TestWriteErrorTornLine checks that a line cut short by a full disk does
// not swallow the start of the next line written.
func TestWriteErrorTornLine(t *testing.T) {
	disk := &fullDisk{}
	dir := t.TempDir()
	c := newCapture(t, Options{Name: "m", Dir: dir, openFile: disk.open})
	copyString(t, c, Out, "whole\n")
	disk.full.Store(true)
	disk.partial.Store(3)
	c.Copy(Out, strings.NewReader("torn line\n"))
	disk.full.Store(false)
	copyString(t, c, Out, "next\n")
	if got, want := readFile(t, filepath.Join(dir, "m.out")), "whole\ntor\nnext\n"; got != want {
		t.Errorf("m.out holds %q, want %q", got, want)
	}
}

// TestWriteErrorsConcurrent fails the writes of several streams and
// incarnations at once, for the race detector, and checks that the
// recovery of each stream counts every line it lost.
func TestWriteErrorsConcurrent(t *testing.T) {
	disk := &fullDisk{}
	var got reports
	c := newCapture(t, Options{Name: "m", Dir: t.TempDir(), openFile: disk.open, OnWriteError: got.add})
	disk.full.Store(true)
	const n = 300
	var wg sync.WaitGroup
	for _, s := range []Stream{Log, Out, Err} {
		for range 2 {
			wg.Go(func() { c.Copy(s, iotest.HalfReader(strings.NewReader(strings.Repeat("x\n", n)))) })
		}
	}
	wg.Wait()
	got.take()
	disk.full.Store(false)
	for _, s := range []Stream{Log, Out, Err} {
		copyString(t, c, s, "y\n")
	}
	want := []string{"log resumed, 600 lost", "out resumed, 600 lost", "err resumed, 600 lost"}
	if g := got.take(); fmt.Sprint(g) != fmt.Sprint(want) {
		t.Errorf("reports %q, want %q", g, want)
	}
}
