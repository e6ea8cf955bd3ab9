package subproc

import (
	"fmt"
	"os"
	"runtime"
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

// sharedRings are the two bodyRings of a child, one per direction.
type sharedRings struct {
	up   *bodyRing // the child's response bodies, and its tunnels' bytes
	down *bodyRing // the parent's request bodies, and the client's bytes in a tunnel
}

// newSharedWord maps a new page of shared memory and returns the word in it,
// with the file to pass to the child. Where the system allows (see
// sealSize and allocateRing), the file holds bodyRings too, which it
// returns; else they are nil.
func newSharedWord() (*acceptWord, sharedRings, *os.File, error) {
	f, err := sharedMemory()
	if err != nil {
		return nil, sharedRings{}, nil, err
	}
	w, err := mapWord(int(f.Fd()))
	if err != nil {
		f.Close()
		return nil, sharedRings{}, nil, err
	}
	// The parent reads the rings' slots all the time: only a file that
	// cannot shrink under it holds them.
	var rings sharedRings
	if sealSize(f) && allocateRing(f) {
		if rings, err = mapRings(int(f.Fd())); err != nil {
			w.close()
			f.Close()
			return nil, sharedRings{}, nil, err
		}
	}
	return w, rings, f, nil
}

// sharedMemory returns a file of one page to map: an anonymous memory file
// where the system has them (see memoryFile), else a temporary file,
// removed at once, in /dev/shm (memory) where it exists, else in the
// temporary directory. The page is written, not just sized, so that a full
// file system fails here rather than with SIGBUS at the child's first store.
func sharedMemory() (*os.File, error) {
	page := make([]byte, os.Getpagesize())
	if f := memoryFile(); f != nil {
		if _, err := f.Write(page); err == nil {
			return f, nil
		}
		f.Close()
	}
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

// exitWord returns the exit word, which follows the accept word in the
// shared page (see armExitWord), or nil for a word in this process.
func (w *acceptWord) exitWord() *atomic.Uint32 {
	if w.mem == nil {
		return nil
	}
	return (*atomic.Uint32)(unsafe.Pointer(&w.mem[8]))
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

// A bodyRing carries one direction's larger body chunks in shared memory,
// instead of through the pipe: the sender copies a chunk into a free slot
// (or, in the child, a handler's write goes into one; see conn.takeSlot)
// and sends a kindDataRef frame naming the slot, and the receiver uses the
// slot's bytes where they are (the parent writes them to the client
// straight from the mapping; the child's handler reads them from it), then
// frees the slot. A chunk thus costs one copy into the ring, instead of a
// copy into the pipe and one out of it, and no pipe pages to allocate and
// free. A child has two: the up ring, from child to parent, and the down
// ring, from parent to child (see sharedRings).
//
// The parent trusts nothing it reads from a ring. As the up ring's
// receiver it never reads a slot's state, only stores it (to free the
// slot), keeps its own record of the slots it holds, and checks every
// kindDataRef against that record; the bytes of a slot are body bytes,
// which it copies to the client and does not parse, and a child that
// rewrites them while the parent copies them garbles only its own response.
// Only the HTTP server's own writer and connection get a slot's bytes; a
// middleware's, which may look at them, gets a copy (see serverWriter).
// As the down ring's sender it reads the states, whose one meaning is
// which slot it may fill next: a child that lies about them garbles only
// its own request bodies, or makes the parent use the pipe. It reads a
// client's body into a slot only through the server's own reader (see
// serverBody), and never past what an http.MaxBytesReader in front of it
// lets through.
//
// When no slot is free, the sender sends its chunk through the pipe as
// before: a ring never makes a sender wait. A receiver that holds every
// slot (a stream whose client stopped reading holds up to its window) thus
// slows the others down to the pipe's speed, and stops none.
//
// The rings follow the acceptWord's page in the shared file: each is a
// page of slot states, one word per cache line, then the slots.
type bodyRing struct {
	mem   []byte                    // the mapping: the states' page, then the slots
	state [ringSlots]*atomic.Uint32 // in mem: ringFree or ringTaken
	next  int                       // sender: where take looks first; guarded by the conn's mu
	held  [ringSlots]atomic.Bool    // receiver: the slots it holds, by its own record
}

const (
	ringSlots = 16       // slots of chunkSize bytes: what a window fills
	ringMin   = 16 << 10 // the smallest chunk worth a slot, whose return costs a store and a read of the state
	ringFree  = 0        // a slot's state: the sender may take it
	ringTaken = 1        // the sender has filled it; the receiver frees it once done
)

// ringSize is the size of a ring's mapping.
func ringSize() int { return os.Getpagesize() + ringSlots*chunkSize }

// sharedSize is the size of a shared file that holds the acceptWord and
// two rings, the up ring first.
func sharedSize() int64 { return int64(os.Getpagesize() + 2*ringSize()) }

// mapRings maps the rings that follow the acceptWord's page in the shared
// file fd.
func mapRings(fd int) (sharedRings, error) {
	var rings sharedRings
	for i, r := range []**bodyRing{&rings.up, &rings.down} {
		off := int64(os.Getpagesize() + i*ringSize())
		mem, err := syscall.Mmap(fd, off, ringSize(), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
		if err != nil {
			return sharedRings{}, fmt.Errorf("mapping shared memory: %w", err)
		}
		*r = newRing(mem)
	}
	return rings, nil
}

// newLocalRings returns rings in anonymous memory, for tests that run both
// sides in memory.
func newLocalRings() sharedRings {
	return sharedRings{up: newLocalRing(), down: newLocalRing()}
}

// newLocalRing returns a ring in anonymous memory, for tests that run both
// sides in memory.
func newLocalRing() *bodyRing {
	mem, err := syscall.Mmap(-1, 0, ringSize(), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_SHARED)
	if err != nil {
		panic(err)
	}
	return newRing(mem)
}

// newRing returns the ring in mem, a mapping of ringSize bytes.
func newRing(mem []byte) *bodyRing {
	r := &bodyRing{mem: mem}
	for i := range r.state {
		r.state[i] = (*atomic.Uint32)(unsafe.Pointer(&mem[i*64]))
	}
	// The mapping outlives the child and the conn: the chunks that hold
	// a slot refer to the ring, which is unmapped once nothing does.
	runtime.AddCleanup(r, func(mem []byte) { syscall.Munmap(mem) }, mem)
	return r
}

// slot returns slot i's bytes.
func (r *bodyRing) slot(i int) []byte {
	off := os.Getpagesize() + i*chunkSize
	return r.mem[off : off+chunkSize : off+chunkSize]
}

// take, in the sender, returns a free slot and marks it taken, or -1 if
// the receiver holds them all.
func (r *bodyRing) take() int {
	for k := range ringSlots {
		i := (r.next + k) % ringSlots
		if r.state[i].Load() == ringFree {
			r.state[i].Store(ringTaken)
			r.next = (i + 1) % ringSlots
			return i
		}
	}
	return -1
}

// hold, in the receiver, records that the sender handed it slot i, and
// reports false if i is no slot or the receiver holds it already: a sender
// that breaks the protocol.
func (r *bodyRing) hold(i uint32) bool {
	return i < ringSlots && r.held[i].CompareAndSwap(false, true)
}

// free, in the receiver, gives slot i back to the sender. The receiver's
// record changes first, so that the sender, which may take the slot again
// as soon as its state says so, cannot hand it over before the receiver
// expects it. The sender frees a slot it took and did not hand over: the
// receiver's record of it, then, says it does not hold it already.
func (r *bodyRing) free(i int) {
	r.held[i].Store(false)
	r.state[i].Store(ringFree)
}
