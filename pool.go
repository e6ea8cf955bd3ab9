package subproc

import (
	"context"
	"time"
)

// This file holds the pool: the slots that the supervisors fill with
// children, and admission, which chooses the child that takes a request,
// waits for one while none can, and counts the requests in flight.

// install makes c the child that takes the slot's requests.
func (s *supervisor) install(c *child) {
	h := s.h
	h.mu.Lock()
	defer h.mu.Unlock()
	s.cur = c
	s.retryAt = time.Time{}
	c.state = "running"
	if c.incarnation > h.lastIncarnation || h.newest == nil {
		h.lastIncarnation = c.incarnation
	}
	h.newest = c
	h.notifyLocked()
}

// uninstall takes c out of its slot, if it fills it, so that it takes no
// new requests. It reports whether no slot has a child left, unless the
// handle is shutting down: the module is then degraded.
func (s *supervisor) uninstall(c *child) (degraded bool) {
	h := s.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if s.cur != c {
		return false
	}
	s.cur = nil
	h.notifyLocked()
	if h.life.Err() != nil {
		return false
	}
	for _, o := range h.slots {
		if o.cur != nil {
			return false
		}
	}
	return true
}

// notifyLocked wakes the requests waiting for a child.
func (h *Handle) notifyLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// acquire returns the child to send a request to: the least loaded child
// that can take it, one that passes its health checks if there is any. It
// waits for one while none can, until deadline. The caller must call
// release.
//
// The timer is created at the first wait, so that a request that finds a
// child running costs none; the caller stops it.
func (h *Handle) acquire(ctx context.Context, deadline **time.Timer) (*child, error) {
	for {
		h.mu.Lock()
		if h.life.Err() != nil {
			h.mu.Unlock()
			return nil, ErrClosed
		}
		if c := h.pickLocked(); c != nil {
			h.inFlight++
			c.inFlight++
			h.mu.Unlock()
			return c, nil
		}
		changed := h.changed
		h.mu.Unlock()
		if *deadline == nil {
			*deadline = time.NewTimer(h.opts.RestartWait)
		}
		select {
		case <-changed:
		case <-(*deadline).C:
			return nil, ErrUnavailable
		case <-ctx.Done():
			return nil, errCanceled
		}
	}
}

// pickLocked returns the child for the next request, or nil if no child can
// take it. Between children equally loaded it goes round the slots.
func (h *Handle) pickLocked() *child {
	var best *child
	n := len(h.slots)
	for i := range n {
		c := h.slots[(h.turn+i)%n].cur
		if c == nil || !c.usable() {
			continue
		}
		if best == nil || better(c, best) {
			best = c
		}
	}
	h.turn++
	return best
}

// better reports whether a should take a request rather than b: a child
// that passed its last health check rather than one that failed it, then
// the one with fewer requests in flight.
func better(a, b *child) bool {
	if (a.failedChecks == 0) != (b.failedChecks == 0) {
		return a.failedChecks == 0
	}
	return a.inFlight < b.inFlight
}

// release ends a request that acquire gave to c. answered says whether c
// answered it, which counts towards c's MaxRequests.
func (h *Handle) release(c *child, answered bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inFlight--
	c.inFlight--
	if answered {
		c.requests++
		h.stats.Requests++
		if c.maxRequests > 0 && c.requests >= c.maxRequests {
			c.askRecycleLocked("max-requests")
		}
	}
	if c.inFlight == 0 && c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
}

// idleLocked returns a channel that is closed once c has no request in
// flight.
func (c *child) idleLocked() <-chan struct{} {
	if c.inFlight == 0 {
		return closedChan
	}
	if c.idle == nil {
		c.idle = make(chan struct{})
	}
	return c.idle
}

// closedChan is a closed channel.
var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()
