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

// monitor health-checks c until c has ended, or has been told to stop, and
// kills it when Options.HealthFailures checks in a row fail. It closes
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
		case <-tick.C:
		}
		if err := h.check(c); err != nil && !h.failedCheck(c, err) {
			c.proc.Kill()
			return
		}
	}
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
	default:
	}
	h.mu.Lock()
	c.failedChecks++
	failed := c.failedChecks
	h.mu.Unlock()
	h.post(Event{Kind: ChildUnhealthy, Pid: c.proc.Pid(), Incarnation: c.incarnation, Reason: "health", Err: err})
	if failed < h.opts.HealthFailures {
		h.logf("health check %d of %d failed for child pid %d: %v", failed, h.opts.HealthFailures, c.proc.Pid(), err)
		return true
	}
	h.logf("child pid %d (incarnation %d) is unhealthy: %d health checks in a row failed (%v); killing it.%s",
		c.proc.Pid(), c.incarnation, failed, err, formatTail(c.tail()))
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
