package main

import (
	"strings"
	"sync"
	"time"

	"github.com/fbbf71ac/subproc"
)

// This file keeps the recent events of every module, as Options.OnEvent
// reports them, for GET /api/state, GET /api/live and
// GET /api/events/{seq}/output.

// maxEvents is how many events the dashboard remembers, all modules
// together; older ones are forgotten.
const maxEvents = 100

// An eventRing remembers the last maxEvents events of every module, each
// numbered in the order it arrived. The zero value is an empty ring, ready
// to use. Its methods may be called concurrently: each module's OnEvent
// runs on a goroutine of its own Handle.
type eventRing struct {
	mu      sync.Mutex    // guards the fields below
	events  []event       // oldest first; at most maxEvents
	seq     uint64        // the number of the last event added; 0: none yet
	changed chan struct{} // closed, and cleared, when an event is added; nil until since asks for it
}

// An event is a subproc.Event as the dashboard keeps it: numbered.
type event struct {
	seq uint64
	ev  subproc.Event
}

// add remembers ev, forgetting the oldest event if the ring is full. It is
// the Options.OnEvent of every module.
func (r *eventRing) add(ev subproc.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	if len(r.events) == maxEvents {
		copy(r.events, r.events[1:])
		r.events = r.events[:maxEvents-1]
	}
	r.events = append(r.events, event{seq: r.seq, ev: ev})
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
}

// since returns the events the ring holds numbered after seq, oldest
// first, and a channel closed when the next event is added. A seq past the
// last event's, as a client of an earlier run of the dashboard may give,
// counts as 0.
func (r *eventRing) since(seq uint64) ([]eventView, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if seq > r.seq {
		seq = 0
	}
	var list []eventView
	for _, e := range r.events {
		if e.seq > seq {
			list = append(list, e.view())
		}
	}
	if r.changed == nil {
		r.changed = make(chan struct{})
	}
	return list, r.changed
}

// eventView is one event in GET /api/state. Its output lines are not in it:
// GET /api/events/{seq}/output serves them, when a person asks.
type eventView struct {
	Seq         uint64    `json:"seq"` // increases by one per event, from 1
	Time        time.Time `json:"time"`
	Module      string    `json:"module"`
	Kind        string    `json:"kind"` // as subproc.EventKind.String: "ChildStarted", …
	Pid         int       `json:"pid"`  // 0 for the module as a whole
	Incarnation int       `json:"incarnation"`
	Reason      string    `json:"reason"`
	Error       string    `json:"error"`       // Event.Err's message; "" if none
	Delay       string    `json:"delay"`       // for a backoff, as in "400ms"; "" otherwise
	OutputLines int       `json:"outputLines"` // how many lines GET /api/events/{seq}/output has
}

// views returns the events the ring holds, newest first.
func (r *eventRing) views() []eventView {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := make([]eventView, 0, len(r.events))
	for i := len(r.events) - 1; i >= 0; i-- {
		list = append(list, r.events[i].view())
	}
	return list
}

// view returns e as GET /api/state shows it.
func (e event) view() eventView {
	v := eventView{
		Seq:         e.seq,
		Time:        e.ev.Time,
		Module:      e.ev.Module,
		Kind:        e.ev.Kind.String(),
		Pid:         e.ev.Pid,
		Incarnation: e.ev.Incarnation,
		Reason:      e.ev.Reason,
		OutputLines: len(e.ev.Output),
	}
	if e.ev.Err != nil {
		v.Error = e.ev.Err.Error()
	}
	if e.ev.Delay > 0 {
		v.Delay = e.ev.Delay.String()
	}
	return v
}

// output returns the child's last output lines that event seq carries, one
// per line of text; ok is false if the ring does not hold that event (any
// more).
func (r *eventRing) output(seq uint64) (text string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.events) == 0 || seq < r.events[0].seq || seq > r.seq {
		return "", false
	}
	ev := r.events[seq-r.events[0].seq].ev
	var b strings.Builder
	for _, l := range ev.Output {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String(), true
}
