package subproc

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// An acceptWord tells the parent which requests a child has taken: before
// it starts a request's handler, the child raises the word to the request's
// id (see raise). It lives in a page of memory shared by parent
// and child, so that the store costs the child no system call and the parent
// no wake-up; the parent reads it only once the child is dead, to learn
// which of the requests in flight the module never saw and may go to the
// next child.
type acceptWord struct {
	mem []byte         // the shared mapping; nil for a word in this process
	v   *atomic.Uint64 // in mem, or on the heap
}

// newLocalWord returns a word that parent and child share because they are
// one process, for tests that run both sides in memory.
func newLocalWord() *acceptWord {
	return &acceptWord{v: new(atomic.Uint64)}
}

// newSharedWord maps a new page of shared memory and returns the word in it,
// with the file to pass to the child.
func newSharedWord() (*acceptWord, *os.File, error) {
	f, err := sharedMemory()
	if err != nil {
		return nil, nil, err
	}
	w, err := mapWord(int(f.Fd()))
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return w, f, nil
}

// sharedMemory returns a file of one page to map: a temporary file,
// removed at once, in /dev/shm (memory) where it exists, else in the
// temporary directory. The page is written, not just sized, so that a full
// file system fails here rather than with SIGBUS at the child's first store.
func sharedMemory() (*os.File, error) {
	page := make([]byte, os.Getpagesize())
	var err error
	for _, dir := range []string{"/dev/shm", os.TempDir()} {
		var f *os.File
		if f, err = os.CreateTemp(dir, "subproc-accept-*"); err != nil {
			continue
		}
		os.Remove(f.Name())
		if _, err = f.Write(page); err == nil {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("creating shared memory: %w", err)
}

// mapWord maps the page of shared memory that fd holds.
func mapWord(fd int) (*acceptWord, error) {
	mem, err := syscall.Mmap(fd, 0, os.Getpagesize(), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping shared memory: %w", err)
	}
	// The mapping is page-aligned, so the word is aligned for atomics.
	return &acceptWord{mem: mem, v: (*atomic.Uint64)(unsafe.Pointer(&mem[0]))}, nil
}

// raise records that the request with the given id has been taken, and
// every request before it: the parent treats every id up to the word's
// value as seen by the module. The word never goes down, though requests
// may reach the child out of order (the parent issues ids before it
// queues their frames): a later request seen first then covers an earlier
// one not seen yet, which, if the child dies, fails with 502 rather than
// going to the next child; a request whose handler ran is never given to
// another child. Only the goroutine that reads the parent's frames calls
// raise.
func (w *acceptWord) raise(id uint64) {
	if id > w.v.Load() {
		w.v.Store(id)
	}
}

// load returns the id last stored.
func (w *acceptWord) load() uint64 { return w.v.Load() }

// close unmaps a shared word. The word must not be used after.
func (w *acceptWord) close() {
	if w.mem != nil {
		syscall.Munmap(w.mem)
		w.mem = nil
	}
}
