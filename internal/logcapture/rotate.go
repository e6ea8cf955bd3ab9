package logcapture

import (
	"cmp"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// backupTimeFormat is the time in a backup's name, <name>-<time>.<ext>, in
// UTC. It is gopkg.in/natefinch/lumberjack.v2's format, which this package
// used before, so that backups made by either are pruned alike.
const backupTimeFormat = "2006-01-02T15-04-05.000"

// megabyte is the unit of Options.MaxSize.
const megabyte = 1 << 20

// file is what a rotatingFile writes to: an *os.File, or a test's stand-in.
type file interface {
	io.WriteCloser
	Stat() (fs.FileInfo, error)
}

// openAppend opens path for appending, creating it if missing.
func openAppend(path string) (file, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
}

// A rotatingFile is an append-only file that rotates by size. A write that
// would take a non-empty file past maxSize first renames the file to a
// backup beside it, <name>-<time>.<ext>, removes the oldest backups beyond
// maxBackups, and starts a new file. Rotation happens inside that write, so
// a rotatingFile starts no goroutine and, once closed, holds no resource.
// Its methods are safe for concurrent use, and concurrent Writes never
// interleave their bytes.
//
// This departs from gopkg.in/natefinch/lumberjack.v2, which this package
// used before: a lumberjack.Logger starts a goroutine on its first write
// that never exits, even after Close, so every distinct log path cost the
// process three goroutines (one per stream) for the rest of its life.
//
// A failed write closes the file; the next Write opens it again, so that
// writing resumes by itself once the cause (a full disk, a removed
// directory) is gone.
type rotatingFile struct {
	path       string                          // fixed; absolute
	maxSize    int64                           // fixed; in bytes, > 0
	maxBackups int                             // fixed; 0 keeps every backup
	open       func(path string) (file, error) // fixed; openAppend but in tests
	now        func() time.Time                // fixed; names backups

	mu   sync.Mutex // guards the fields below
	f    file       // the open file; nil before the first write, after a failed one, and after Close
	size int64      // the bytes in f
	torn bool       // a failed write left the file inside a line: the next write starts a new one
}

// newRotatingFile returns a rotatingFile for path, which it does not open
// yet. maxSize is in bytes; maxBackups 0 keeps every backup. A nil open
// means openAppend, a nil now time.Now.
func newRotatingFile(path string, maxSize int64, maxBackups int, open func(string) (file, error), now func() time.Time) *rotatingFile {
	if open == nil {
		open = openAppend
	}
	if now == nil {
		now = time.Now
	}
	return &rotatingFile{path: path, maxSize: maxSize, maxBackups: maxBackups, open: open, now: now}
}

// Open opens the file, unless it is open, so that an unusable path fails
// before the first line is written.
func (r *rotatingFile) Open() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.openLocked()
}

// openLocked opens the file unless it is open. r.mu must be held.
func (r *rotatingFile) openLocked() error {
	if r.f != nil {
		return nil
	}
	f, err := r.open(r.path)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	r.f, r.size = f, st.Size()
	return nil
}

// Write appends p to the file, rotating it first if p would take it past
// maxSize. A p longer than maxSize goes whole into a file of its own.
// If the write fails, Write closes the file and returns the error with the
// number of p's bytes written; if some were, the next Write begins with a
// newline, so that the bytes it writes start on a line of their own. A
// failed rotation does not fail the write: the bytes are appended to the
// file as it is, and the rotation is tried again at the next Write.
func (r *rotatingFile) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.openLocked(); err != nil {
		return 0, err
	}
	if r.size > 0 && r.size+int64(len(p)) > r.maxSize {
		if err := r.rotateLocked(); err != nil {
			return 0, err
		}
	}
	b := p
	if r.torn && len(p) > 0 {
		b = append([]byte{'\n'}, p...)
	}
	n, err := r.f.Write(b)
	r.size += int64(n)
	if n > 0 {
		r.torn = b[n-1] != '\n' && err != nil
	}
	if err != nil {
		r.f.Close()
		r.f = nil
		return max(0, n-(len(b)-len(p))), err
	}
	return len(p), nil
}

// rotateLocked renames the file to a new backup, opens a new file and
// prunes the backups. If the rename fails it reopens the file as it was.
// It returns an error only if no file could be opened. r.mu must be held.
func (r *rotatingFile) rotateLocked() error {
	r.f.Close()
	r.f = nil
	renamed := os.Rename(r.path, r.backupName()) == nil
	if err := r.openLocked(); err != nil {
		return err
	}
	if renamed {
		r.pruneLocked()
	}
	return nil
}

// backupName returns a free name for a new backup of the file:
// <name>-<time>.<ext>, or <name>-<time>-<n>.<ext> if a backup was made in
// the same millisecond.
func (r *rotatingFile) backupName() string {
	dir, base, ext := r.split()
	stem := base + "-" + r.now().UTC().Format(backupTimeFormat)
	name := filepath.Join(dir, stem+ext)
	for n := 1; ; n++ {
		if _, err := os.Lstat(name); os.IsNotExist(err) {
			return name
		}
		name = filepath.Join(dir, stem+"-"+strconv.Itoa(n)+ext)
	}
}

// split returns the file's directory, its name without extension, and its
// extension (with the dot).
func (r *rotatingFile) split() (dir, base, ext string) {
	dir, name := filepath.Split(r.path)
	ext = filepath.Ext(name)
	return dir, strings.TrimSuffix(name, ext), ext
}

// A backup is a rotated file found by pruneLocked.
type backup struct {
	name string    // in the file's directory
	time time.Time // from the name
	seq  int       // from the name; 0 for the first backup of its millisecond
}

// backups returns the file's backups, oldest first. Files whose name is not
// a backup name of this file, such as another module's, are left out.
func (r *rotatingFile) backups() ([]backup, error) {
	dir, base, ext := r.split()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var found []backup
	for _, e := range entries {
		mid, ok := strings.CutPrefix(e.Name(), base+"-")
		if !ok || !e.Type().IsRegular() {
			continue
		}
		if mid, ok = strings.CutSuffix(mid, ext); !ok || len(mid) < len(backupTimeFormat) {
			continue
		}
		t, err := time.Parse(backupTimeFormat, mid[:len(backupTimeFormat)])
		if err != nil {
			continue
		}
		b := backup{name: e.Name(), time: t}
		if rest := mid[len(backupTimeFormat):]; rest != "" {
			digits, ok := strings.CutPrefix(rest, "-")
			if b.seq, err = strconv.Atoi(digits); !ok || err != nil || b.seq < 1 {
				continue
			}
		}
		found = append(found, b)
	}
	slices.SortFunc(found, func(a, b backup) int {
		return cmp.Or(a.time.Compare(b.time), cmp.Compare(a.seq, b.seq))
	})
	return found, nil
}

// pruneLocked removes the oldest backups beyond maxBackups. Its failures
// are not reported: they cost disk space, never a line. r.mu must be held,
// so that two pruning writes never race.
func (r *rotatingFile) pruneLocked() {
	if r.maxBackups == 0 {
		return
	}
	found, err := r.backups()
	if err != nil || len(found) <= r.maxBackups {
		return
	}
	dir, _, _ := r.split()
	for _, b := range found[:len(found)-r.maxBackups] {
		os.Remove(filepath.Join(dir, b.name))
	}
}

// Close closes the file. A later Write opens it again.
func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}
