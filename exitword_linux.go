package subproc

import (
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// The exit word tells the parent that a child is dying as soon as its
// first thread has begun to exit, a millisecond or so before the pipe
// ends: the kernel closes a dead process's files only after it has freed
// all its memory. The child makes the word a robust futex that one of its
// threads owns (see armExitWord); as each thread of a dying process exits,
// before the memory goes, the kernel marks the futexes that thread owns
// with FUTEX_OWNER_DIED and wakes a waiter, here the parent (see
// waitExitWord). The parent then starts the child's replacement beside its
// teardown (see supervisor.startEarly).
//
// The word is a hint, never a proof: the child can write anything to it.
// A parent told that a child is dying kills it, so that the hint comes
// true; and it stops listening after a few changes of the word that are not
// a death, so that a child flipping it cannot keep a thread of the parent
// busy.

// Bits of a futex word (see futex(2), "Robust futexes").
const (
	futexWaiters   = 0x80000000
	futexOwnerDied = 0x40000000
	futexTIDMask   = 0x3fffffff
)

// Futex operations.
const (
	futexWait = 0
	futexWake = 1
)

// robustList is the child's robust futex list: a head and one entry, whose
// futex is the exit word. The kernel reads it when the owning thread exits,
// so it lives in a package variable, which never moves and never dies.
var robustList struct {
	head struct {
		next    uintptr // the first entry: entry
		offset  int     // from an entry to its futex word: a C long
		pending uintptr // an entry being taken or released; none
	}
	entry uintptr // the entry's next: back to head, which ends the list
}

// armExitWord, called once in the child, makes word a robust futex owned by
// a thread that lives as long as the process, and reports whether it
// could.
func armExitWord(word *atomic.Uint32) bool {
	armed := make(chan bool)
	go func() {
		// Never unlocked: the thread must end only with the process.
		// The goroutine never returns once the list is set, so that the
		// thread keeps it.
		runtime.LockOSThread()
		h := &robustList.head
		h.next = uintptr(unsafe.Pointer(&robustList.entry))
		h.offset = int(uintptr(unsafe.Pointer(word)) - uintptr(unsafe.Pointer(&robustList.entry)))
		robustList.entry = uintptr(unsafe.Pointer(h))
		_, _, errno := syscall.RawSyscall(syscall.SYS_SET_ROBUST_LIST, uintptr(unsafe.Pointer(h)), unsafe.Sizeof(*h), 0)
		if errno != 0 {
			armed <- false
			return // and the thread ends with the goroutine, owning nothing
		}
		word.Store(uint32(syscall.Gettid()) & futexTIDMask)
		armed <- true
		select {}
	}()
	return <-armed
}

// maxExitWordChanges bounds the wake-ups and changes of the exit word, other
// than a death, that waitExitWord follows before it stops listening.
const maxExitWordChanges = 4

// waitExitWord waits, in the parent, until the thread that owns word dies,
// and reports true; it reports false if stopExitWord is called first, if
// the word was never armed, or if it keeps changing without a death (see
// maxExitWordChanges). It blocks its thread.
func waitExitWord(word *atomic.Uint32, stopped *atomic.Bool) bool {
	// A death is seen on the first wake-up: every other one counts.
	for range maxExitWordChanges + 1 {
		v := word.Load()
		switch {
		case stopped.Load():
			return false
		case v&futexOwnerDied != 0:
			return true
		case v&futexTIDMask == 0:
			return false // never armed, or stopped
		case v&futexWaiters == 0:
			// The kernel wakes a waiter only if this bit is set.
			if !word.CompareAndSwap(v, v|futexWaiters) {
				continue
			}
			v |= futexWaiters
		}
		// Not FUTEX_PRIVATE: the word is in memory shared with the child.
		syscall.Syscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWait, uintptr(v), 0, 0, 0)
	}
	return false
}

// stopExitWord makes waitExitWord return. The child must be dead, as it
// clears the word: a waiter that has not gone to sleep yet then finds the
// word changed, so no wake-up is lost.
func stopExitWord(word *atomic.Uint32, stopped *atomic.Bool) {
	stopped.Store(true)
	word.Store(0)
	syscall.Syscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWake, 1, 0, 0, 0)
}
