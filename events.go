package subproc

import (
	"bytes"
	"fmt"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the events of a module's life: the Event type, and the
// queue that delivers them to Options.OnEvent from one goroutine, in order.

// An Event reports one change in a module's life. Options.OnEvent receives
// them.
type Event struct {
	Time        time.Time
	Module      string
	Kind        EventKind // what happened
	Pid         int       // the child it happened to; 0 for the module as a whole
	Incarnation int
	// Slot is the place in the pool (see Options.Children and Env.Slot)
	// of the child it happened to, or that was being started; for
	// ModuleBackoff and ModuleDegraded, of the child whose end caused it.
	Slot int
	// Reason says why, as one of the fixed words "crash", "health",
	// "memory", "max-requests", "lifetime", "stuck", "restart", "protocol",
	// "shutdown" and "backoff". For ChildStarted it is why the child it
	// follows had to go ("crash" for a restart after a crash, "restart" or
	// "lifetime" for a replacement, …), and "" for a first start.
	Reason string
	Err    error         // the error behind it, if any
	Output []string      // the child's last lines of output, for exits and failures
	Delay  time.Duration // for ModuleBackoff: how long the next start waits
}

// An EventKind says what an Event reports.
type EventKind int

const (
	ChildStarted   EventKind = iota // a child became ready
	ChildUnhealthy                  // a health check failed
	ChildStuck                      // a handler outlived StuckTimeout; its goroutine stacks are in the module's log
	ChildRecycling                  // a child is being replaced gracefully (Reason says why)
	ChildExited                     // a child ended (Err says how)
	ModuleBackoff                   // the next start waits Delay: the module keeps failing
	ModuleDegraded                  // no child can serve; requests get 503
)

var eventKindNames = [...]string{
	ChildStarted:   "ChildStarted",
	ChildUnhealthy: "ChildUnhealthy",
	ChildStuck:     "ChildStuck",
	ChildRecycling: "ChildRecycling",
	ChildExited:    "ChildExited",
	ModuleBackoff:  "ModuleBackoff",
	ModuleDegraded: "ModuleDegraded",
}

// String returns the kind's name, as in "ChildStarted".
func (k EventKind) String() string {
	if k >= 0 && int(k) < len(eventKindNames) {
		return eventKindNames[k]
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// maxQueuedEvents bounds the events waiting for a slow OnEvent. Beyond it,
// new events are dropped, and the parent logs how many.
const maxQueuedEvents = 4096

// maxQueuedOutput bounds the bytes of Output that the events waiting for a
// slow OnEvent hold: a child's last lines may be long (see
// logcapture.Tail), and children may exit quickly. Beyond it, new events
// are queued with their Output replaced by one line that says so.
const maxQueuedOutput = 4 << 20

// An eventQueue delivers events to a callback from one goroutine, in the
// order they were posted, without ever blocking the poster.
type eventQueue struct {
	fn   func(Event)          // fixed; nil: events are discarded
	logf func(string, ...any) // fixed; reports dropped events
	wake chan struct{}        // capacity 1; signalled on post and on close
	done chan struct{}        // closed when run has returned
	gid  atomic.Uint64        // run's goroutine, for inCallback

	mu      sync.Mutex // guards the fields below
	queue   []Event
	output  int  // bytes of Output in queue
	dropped int  // events dropped since the last report
	closed  bool // close was called: post discards
}

func newEventQueue(fn func(Event), logf func(string, ...any)) *eventQueue {
	q := &eventQueue{fn: fn, logf: logf, wake: make(chan struct{}, 1), done: make(chan struct{})}
	if fn == nil {
		close(q.done)
		return q
	}
	go q.run()
	return q
}

// post queues ev for the callback. It never blocks.
func (q *eventQueue) post(ev Event) {
	if q.fn == nil {
		return
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	if len(q.queue) >= maxQueuedEvents {
		q.dropped++
		return
	}
	n := 0
	for _, line := range ev.Output {
		n += len(line)
	}
	if q.output+n > maxQueuedOutput {
		ev.Output, n = []string{fmt.Sprintf("[%d bytes of output dropped: Options.OnEvent is too slow]", n)}, 0
	}
	q.output += n
	q.queue = append(q.queue, ev)
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// close delivers the events already posted, then ends the queue's
// goroutine; it returns once it has. Later posts are discarded.
func (q *eventQueue) close() {
	if q.fn == nil {
		return
	}
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	<-q.done
}

func (q *eventQueue) run() {
	defer close(q.done)
	q.gid.Store(goroutineID())
	for {
		q.mu.Lock()
		batch, dropped, closed := q.queue, q.dropped, q.closed
		q.queue, q.output, q.dropped = nil, 0, 0
		q.mu.Unlock()
		if dropped > 0 {
			q.logf("Options.OnEvent is too slow: %d events were dropped while %d waited for it", dropped, maxQueuedEvents)
		}
		for _, ev := range batch {
			q.deliver(ev)
		}
		if len(batch) == 0 {
			if closed {
				return
			}
			<-q.wake
		}
	}
}

// inCallback reports whether its caller runs on the callback's goroutine:
// the callback itself, or what it called. Whoever waits for the queue to
// end (see close) must not, there.
func (q *eventQueue) inCallback() bool {
	return q.fn != nil && q.gid.Load() == goroutineID()
}

// goroutineID returns the calling goroutine's id, which the runtime writes
// at the head of its stack trace ("goroutine 18 [running]:"). It serves
// only to recognise a goroutine, never to schedule one.
func goroutineID() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, _ := strconv.ParseUint(string(b), 10, 64)
	return id
}

// deliver calls the callback with ev. A panic in it is logged, with its
// stack, and the next event is delivered: it must not end the program
// from a goroutine its author cannot guard.
func (q *eventQueue) deliver(ev Event) {
	defer func() {
		if v := recover(); v != nil {
			q.logf("Options.OnEvent panicked on a %v event: %v\n%s", ev.Kind, v, debug.Stack())
		}
	}()
	q.fn(ev)
}
