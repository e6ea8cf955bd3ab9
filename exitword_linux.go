package subproc

import (
	"math"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// The exit word tells the parent that a child is dying a millisecond or so
// before its pipe ends: the kernel closes a dead process's files only after
// it has freed all its memory. The child makes the word a robust futex that
// one of its threads owns (see armExitWord); as each thread of a dying
// process exits, before the memory goes, the kernel marks the futexes that
// thread owns with FUTEX_OWNER_DIED and wakes a waiter, here the parent (see
// waitExitWord). So does an execve, which ends the process's program. The
// parent then kills the child and starts its replacement beside the
// teardown (see supervisor.run).
//
// The word is a hint, never a proof: the child can write anything to it,
// and do anything to the futex. A parent told that a child is dying kills
// it, so that the hint comes true; it stops listening after a few wake-ups
// that are not a death, so that a child flipping the word cannot keep a
// thread of the parent busy; and its sleeps are bounded (exitWordPoll), so
// that a child that hides its waiter cannot keep it asleep.

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
// a thread that lives as long as the process, if it can: else the word
// stays 0, and the parent does not watch it.
func armExitWord(word *atomic.Uint32) {
	armed := make(chan struct{})
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
			close(armed)
			return // and the thread ends with the goroutine, owning nothing
		}
		word.Store(uint32(syscall.Gettid()) & futexTIDMask)
		close(armed)
		select {}
	}()
	<-armed
}

// maxExitWordChanges bounds the wake-ups and changes of the exit word, other
// than a death, that waitExitWord follows before it stops listening.
const maxExitWordChanges = 4

// exitWordPoll bounds each of waitExitWord's sleeps. A hostile child can
// keep the waiter from ever being woken: move it to a futex of its own
// (FUTEX_REQUEUE), take the wake-up meant for it, or write back the value
// it sleeps on. The waiter still sees stopExitWord within exitWordPoll.
const exitWordPoll = time.Second

// waitExitWord waits, in the parent, until the thread that owns word dies,
// and reports true; it reports false once stopExitWord is called, if the
// word was never armed, or if it keeps changing without a death (see
// maxExitWordChanges). It blocks its thread.
func waitExitWord(word *atomic.Uint32, stopped *atomic.Bool) bool {
	ts := syscall.NsecToTimespec(int64(exitWordPoll))
	// A death is seen on the first wake-up: every other one counts, but
	// the sleeps that end on their own.
	for changes := 0; changes <= maxExitWordChanges; {
		v := word.Load()
		switch {
		case v&futexOwnerDied != 0:
			return true
		case stopped.Load():
			return false
		case v&futexTIDMask == 0:
			return false // never armed, or stopped
		case v&futexWaiters == 0:
			// The kernel wakes a waiter only if this bit is set.
			if !word.CompareAndSwap(v, v|futexWaiters) {
				changes++
				continue
			}
			v |= futexWaiters
		}
		// Not FUTEX_PRIVATE: the word is in memory shared with the child.
		_, _, errno := syscall.Syscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWait, uintptr(v), uintptr(unsafe.Pointer(&ts)), 0, 0)
		if errno != syscall.ETIMEDOUT {
			changes++
		}
	}
	return false
}

// stopExitWord makes waitExitWord return, at once unless the child hid the
// waiter (see exitWordPoll). The child must be dead: unless the word records
// the death, it is cleared, so that a waiter that has not gone to sleep yet
// finds it changed and no wake-up is lost.
func stopExitWord(word *atomic.Uint32, stopped *atomic.Bool) {
	stopped.Store(true)
	for range maxExitWordChanges { // a process the module started may write it too
		v := word.Load()
		if v&futexOwnerDied != 0 || word.CompareAndSwap(v, 0) {
			break
		}
	}
	syscall.Syscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWake, math.MaxInt32, 0, 0, 0)
}
