package subproc

import (
	"fmt"
	"strings"
	"time"
)

// This file holds the health checks of a child: the monitor that pings it
// every HealthInterval from the moment it is ready until it has ended, and
// kills it after HealthFailures failed checks in a row, and the record of
// each child's checks that Stats shows.

// monitor checks c every Options.HealthInterval until c has ended, or
// has been told to stop: its memory against MemoryMax (a kill) and
// MemoryHigh (a recycle), its given-up requests against StuckTimeout (a
// recycle, with its goroutine stacks in the module's log), and its health,
// killing it when Options.HealthFailures checks in a row fail. It closes
// c.monitored when it returns.
func (h *Handle) monitor(c *child) {
	defer close(c.monitored)
	tick := time.NewTicker(h.opts.HealthInterval)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-c.stopping:
			return // it answers nothing more
		case <-c.broken:
			h.pipeBroken(c)
			return
		case <-c.hung:
			h.killHung(c) // Handle.HealthCheck's check was the last to fail
			return
		case <-tick.C:
		}
		if !h.checkMemory(c) {
			c.proc.Kill()
			return
		}
		h.checkStuck(c)
		if err := h.check(c); err != nil && !h.failedCheck(c, err) {
			h.killHung(c)
			return
		}
	}
}

// pipeBroken handles c once a write to it has failed: the frames of that
// write, among them perhaps a request's, and of every later one are lost,
// so c takes no more requests (see usable). A child that exits closes its
// end of the pipe a moment before it is reaped, and gets exitWait to be
// found dead; one that lives on without it (it closed it, or put another
// file in its place) has broken the protocol, and is killed, so that its
// requests fail, or go to the next child if it had not taken them, and the
// slot restarts, instead of waiting for health checks that fail.
func (h *Handle) pipeBroken(c *child) {
	if c.awaitExit() {
		return
	}
	select {
	case <-c.done:
		return // its pipe ended too: readLoop sees to it
	default:
	}
	err := &protocolError{"the pipe to the child failed while the child lives on"}
	c.condemn(err)
	h.logf("child pid %d: %v; killing it (the module will restart)", c.proc.Pid(), err)
	c.proc.Kill()
}

// quitGrace is how long a child killed for failing its health checks is
// given, after SIGQUIT, to write its goroutine stacks to its stderr.
const quitGrace = time.Second

// killHung kills c, which failed its health checks: first with SIGQUIT,
// which makes the Go runtime write every goroutine's stack to the child's
// stderr (the module's .err log, or the parent's stderr), then, quitGrace
// later or once the child has exited, with SIGKILL. A stopped child, which
// can write nothing, is killed at once.
func (h *Handle) killHung(c *child) {
	if c.proc.Quit() {
		t := time.NewTimer(quitGrace)
		defer t.Stop()
		select {
		case <-c.exited:
		case <-t.C:
		}
	}
	c.proc.Kill()
}

// checkMemory reads c's resident memory and acts on Options.MemoryMax and
// MemoryHigh. It reports false if c is past MemoryMax and must be killed.
func (h *Handle) checkMemory(c *child) bool {
	m := c.proc.Memory()
	h.mu.Lock()
	c.memory = m
	high := h.opts.MemoryHigh > 0 && m > h.opts.MemoryHigh && !c.recycleAsked
	if high {
		c.askRecycleLocked("memory")
	}
	h.mu.Unlock()
	switch {
	case h.opts.MemoryMax > 0 && m > h.opts.MemoryMax:
		c.condemn(h.killedForMemory(c, m, "as its resident memory"))
		return false
	case high:
		h.logf("child pid %d (incarnation %d) is replaced: its resident memory, %s, passed Options.MemoryHigh, %s", c.proc.Pid(), c.incarnation, inMiB(m), inMiB(h.opts.MemoryHigh))
	}
	return true
}

// killedForMemory logs that c is killed as what (its memory, as measured)
// came to m, past Options.MemoryMax, and returns the error that says so.
func (h *Handle) killedForMemory(c *child, m int64, what string) *killedError {
	err := &killedError{fmt.Sprintf("%s, %s, passed Options.MemoryMax, %s", what, inMiB(m), inMiB(h.opts.MemoryMax)), "memory"}
	h.logf("child pid %d (incarnation %d) is killed %s", c.proc.Pid(), c.incarnation, err.reason)
	return err
}

// inMiB formats a number of bytes in MiB.
func inMiB(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// checkStuck finds out whether a handler of c has run on for
// Options.StuckTimeout after the parent gave its request up; then c is
// stuck: it is asked to write its goroutine stacks to the module's log, a
// ChildStuck event reports it, and it is replaced gracefully. The parent
// has already released what it held for those requests (see forget).
func (h *Handle) checkStuck(c *child) {
	if h.opts.StuckTimeout < 0 {
		return
	}
	oldest, n := c.givenUpSince()
	if n == 0 || time.Since(oldest) < h.opts.StuckTimeout {
		return
	}
	h.mu.Lock()
	reported := c.stuck
	c.stuck = true
	h.mu.Unlock()
	if reported {
		return
	}
	// The event carries what the module wrote before it was found stuck;
	// the stacks, which it writes next, go to its log.
	tail := c.tail()
	c.post(outFrame{kind: kindStacks})
	err := fmt.Errorf("%d handlers ran on for more than Options.StuckTimeout (%v) after their requests ended", n, h.opts.StuckTimeout)
	h.logf("child pid %d (incarnation %d) is stuck: %v; its goroutine stacks are in the module's log; replacing it", c.proc.Pid(), c.incarnation, err)
	h.post(Event{Kind: ChildStuck, Pid: c.proc.Pid(), Incarnation: c.incarnation, Slot: c.slot, Reason: "stuck", Err: err, Output: tail})
	// Only now: the supervisor posts the recycle's ChildRecycling, which
	// must come after the ChildStuck that caused it.
	h.mu.Lock()
	c.askRecycleLocked("stuck")
	h.mu.Unlock()
}

// check health-checks c once, recording the outcome.
func (h *Handle) check(c *child) error {
	timeout := make(chan struct{})
	t := time.AfterFunc(h.opts.HealthTimeout, func() { close(timeout) })
	defer t.Stop()
	rtt, err := c.ping(timeout)
	if err == nil {
		h.passedCheck(c, rtt)
	}
	return err
}

// passedCheck records a health check of c that succeeded after rtt.
func (h *Handle) passedCheck(c *child, rtt time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c.failedChecks = 0
	c.lastRTT = rtt
}

// failedCheck records a health check of c that failed with err. It reports
// whether c may live on: false once HealthFailures checks in a row have
// failed, when c has been condemned and is to be killed.
func (h *Handle) failedCheck(c *child, err error) bool {
	select {
	case <-c.done:
		return true // dead already: its death, not the check, says why
	case <-c.broken:
		return true // its pipe failed: the monitor sees to it (see pipeBroken)
	default:
	}
	c.mu.Lock()
	ended := c.err != nil // its pipe ended (it is dying), or it was condemned
	c.mu.Unlock()
	if ended {
		return true // the same: its end, not the check, says why
	}
	h.mu.Lock()
	c.failedChecks++
	failed := c.failedChecks
	h.mu.Unlock()
	tail := c.tail()
	h.post(Event{Kind: ChildUnhealthy, Pid: c.proc.Pid(), Incarnation: c.incarnation, Slot: c.slot, Reason: "health", Err: err, Output: tail})
	if failed < h.opts.HealthFailures {
		h.logf("health check %d of %d failed for child pid %d: %v", failed, h.opts.HealthFailures, c.proc.Pid(), err)
		return true
	}
	h.logf("child pid %d (incarnation %d) is unhealthy: %d health checks in a row failed (%v); killing it.%s",
		c.proc.Pid(), c.incarnation, failed, err, formatTail(tail))
	c.condemn(&killedError{fmt.Sprintf("after failing %d health checks in a row", failed), "health"})
	return false
}

// A killedError is why the parent killed a child; the requests the child
// had in flight fail with it.
type killedError struct {
	reason string // for people: "after failing 3 health checks in a row"
	word   string // the Event reason: "health", …
}

func (e *killedError) Error() string { return "the child was killed " + e.reason }

// formatTail formats the last lines of a module's output for the log.
func formatTail(lines []string) string {
	if len(lines) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString(" Last lines of its output:")
	for _, l := range lines {
		if len(l) > 500 {
			l = l[:500] + "…"
		}
		b.WriteString("\n\t")
		b.WriteString(l)
	}
	return b.String()
}
