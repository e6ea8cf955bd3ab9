package subproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"time"

	"github.com/fbbf71ac/subproc/internal/logcapture"
)

// This file holds the supervision of a module's children. One supervisor
// per slot of the pool (Options.Children) owns the life of the child that
// fills its slot: it starts it, restarts it with backoff when it dies,
// replaces it gracefully when asked (Restart, recycling), and drains and
// stops the children it replaces. The health checks of each child are in
// health.go; the choice of a child for a request, in pool.go.

// A supervisor owns one slot of a module's pool.
type supervisor struct {
	h    *Handle         // fixed
	slot int             // fixed
	asks chan replaceAsk // Restart's asks for a replacement

	// drained, if not nil, is closed when the drain of the child that
	// the slot's last replacement replaced has ended. Owned by the
	// supervisor's goroutine.
	drained chan struct{}

	// Guarded by h.mu.
	cur     *child    // the child that takes the slot's requests; nil while none does
	retryAt time.Time // while cur is nil: when the next start is due
}

// A replaceAsk asks a supervisor to replace its child gracefully.
type replaceAsk struct {
	reason string          // the Event reason: "restart", "max-requests", …
	ctx    context.Context // bounds the start of the replacement
	done   chan error      // receives the outcome once the old child has stopped; capacity 1
	// ready, if not nil, receives nil once the replacement is ready (or
	// nothing was left to replace), or the start's error, before done;
	// capacity 1.
	ready chan error
}

// started reports the start's outcome to whoever asked, if anyone did.
func (a replaceAsk) started(err error) {
	if a.ready != nil {
		a.ready <- err
	}
}

// finished reports the replacement's outcome to whoever asked, if anyone
// did.
func (a replaceAsk) finished(err error) {
	if a.done != nil {
		a.done <- err
	}
}

// Restart backoff: see Options.MaxRestartDelay.
const minRestartDelay = 100 * time.Millisecond

// stableUptime is how long a child must have served for its death to count
// as a single crash of a healthy module, which restarts at once, rather
// than one more of a module that keeps dying, which backs off.
const stableUptime = time.Second

// maxJitter is the largest share of MaxRequests and MaxLifetime by which a
// child's limit is lowered at random, so that the children of a pool,
// started together, are not recycled together.
const maxJitter = 0.10

// jitter returns v lowered by a random share of up to maxJitter.
func jitter[T int | time.Duration](v T) T {
	return v - T(float64(v)*maxJitter*rand.Float64())
}

// run supervises the slot, served by c, until Shutdown, and returns once
// the slot's last child has been reaped.
func (s *supervisor) run(c *child) {
	failures := 0 // children in a row that died young, or failed to start
	for {
		if !s.serve(&c, &failures) {
			return
		}
		// c has died, or is dying: it served this long.
		if time.Since(c.readyAt) >= stableUptime {
			failures = 0
		}
		failures++
		var early <-chan startResult
		if !c.retired { // else it died while its replacement started, which failed (see replace)
			if s.h.restartDelay(failures) == 0 {
				// The restart need not wait for the dead child's
				// teardown. The kill comes first, so that the child
				// is dead, as its exit word may only claim, and so is
				// its process group, whose processes may hold what
				// the next child needs (a port, a lock).
				c.proc.Kill()
				early = s.startEarly()
			}
			s.retire(c)
		}
		_, why := c.endReason()
		if c = s.restart(&failures, why, early); c == nil {
			return
		}
	}
}

// A startResult is the outcome of a child's start.
type startResult struct {
	c   *child
	err error
}

// startEarly starts the slot's next child in the background, for restart.
// The child is ready, or has failed, when the result arrives; its
// ChildStarted event is restart's to post, after the dead child's
// ChildExited.
func (s *supervisor) startEarly() <-chan startResult {
	res := make(chan startResult, 1)
	go func() {
		if err := s.h.life.Err(); err != nil {
			res <- startResult{err: &StartError{Module: s.h.name, Err: err}} // shutting down: no start
			return
		}
		c, err := s.h.launchChild(s.h.life, s.slot)
		res <- startResult{c, err}
	}()
	return res
}

// serve waits while c serves the slot, replacing it when it is due for
// recycling or asked to. It returns true when the slot's child (c or a
// replacement) has died or is dying, which it leaves in *c; false once
// Shutdown has drained and stopped it. A child replaced after it served
// for stableUptime resets *failures: the module is healthy, and a crash
// of its replacement is a single crash.
func (s *supervisor) serve(cp **child, failures *int) (died bool) {
	h := s.h
	c := *cp
	defer func() { *cp = c }()
	lifetime := time.NewTimer(0)
	lifetime.Stop()
	defer lifetime.Stop()
	var expire <-chan time.Time // nil without a MaxLifetime
	arm := func() {
		if d := h.opts.MaxLifetime; d > 0 {
			lifetime.Reset(time.Until(c.readyAt.Add(jitter(d))))
			expire = lifetime.C
		}
	}
	arm()
	var retry <-chan time.Time // the next try of a recycle whose replacement failed
	retryAsk := replaceAsk{}
	retries := 0
	for {
		// A recycle that is due (the child's MaxRequests, MaxLifetime,
		// MemoryHigh or a stuck handler, or the retry of one whose
		// replacement failed) waits for the drain of the child that the
		// last one replaced: a drain can last ShutdownTimeout (a client that
		// reads nothing), and recycles that did not wait would keep a
		// child for each, without bound. Restart does not wait.
		recycle, expireNow, retryNow := c.recycle, expire, retry
		if s.drained != nil {
			recycle, expireNow, retryNow = nil, nil, nil
		}
		var ask replaceAsk
		select {
		case <-s.drained: // nil: none under way
			s.drained = nil
			continue
		case <-c.done:
			return true
		case <-c.dying:
			// The child is dying (see armExitWord): its restart
			// need not wait for its pipe to end. run kills it
			// first, which makes sure of the death that the child
			// only claimed.
			return true
		case <-c.exited:
			// Reaped, while its pipe lives on: a process it started
			// holds it (and, where there is no exit word, nothing
			// else would tell).
			return true
		case <-h.life.Done():
			s.uninstall(c)
			h.drain(c, "shutdown", 0)
			return false
		case <-expireNow:
			ask = replaceAsk{reason: "lifetime"}
		case reason := <-recycle:
			ask = replaceAsk{reason: reason}
		case <-retryNow:
			ask = retryAsk
		case ask = <-s.asks:
		}
		nc, gone, err := s.replace(c, ask)
		switch {
		case gone && err != nil:
			// c died, and is retired, and its replacement failed: the
			// slot restarts as after any death.
			return true
		case err == nil:
			if time.Since(c.readyAt) >= stableUptime {
				*failures = 0
			}
			if gone {
				// c died, as run counts a death: nc is its restart.
				*failures++
			}
			c, retry, retries = nc, nil, 0
			arm()
		case h.life.Err() != nil:
			// Shut down while the replacement started: the next turn
			// drains c.
		default:
			h.logf("child pid %d (incarnation %d) keeps serving: its replacement (%s) failed to start: %v", c.proc.Pid(), c.incarnation, ask.reason, err)
			if ask.reason != "restart" {
				// The recycling is still due: try again, backing off.
				retries++
				d := h.restartDelay(retries + 1)
				// A delay before the next start: the module keeps
				// failing to start, as after a crash (see restart).
				h.post(Event{Kind: ModuleBackoff, Slot: s.slot, Reason: "backoff", Delay: d})
				retry, retryAsk = time.After(d), replaceAsk{reason: ask.reason}
			}
		}
	}
}

// replace starts a child to take old's place and, once it is ready, moves
// the slot's new requests to it and drains old in the background. If the
// new child cannot start, old keeps serving. The ask's done, if any,
// receives the outcome: at once for a failure, once old has stopped
// otherwise.
//
// If old dies while the new child starts, it is retired at once, as a
// crash (see retire), and the new child, once ready, takes the slot as a
// restarted one would; replace reports old gone. If the new child then
// fails to start too, the slot has no child.
func (s *supervisor) replace(old *child, ask replaceAsk) (nc *child, oldGone bool, err error) {
	h := s.h
	h.post(Event{Kind: ChildRecycling, Pid: old.proc.Pid(), Incarnation: old.incarnation, Slot: old.slot, Reason: ask.reason})
	ctx, cancel := context.WithCancel(h.life)
	defer cancel()
	if ask.ctx != nil {
		stop := context.AfterFunc(ask.ctx, cancel)
		defer stop()
	}
	started := make(chan startResult, 1)
	go func() {
		// Its ChildStarted is posted below, after old's ChildExited if
		// old dies meanwhile.
		c, err := h.launchChild(ctx, s.slot)
		started <- startResult{c, err}
	}()
	var r startResult
	select {
	case r = <-started:
	case <-old.done:
		oldGone = true
	case <-old.dying:
		oldGone = true
	case <-old.exited:
		oldGone = true
	}
	if oldGone {
		old.proc.Kill() // as run does: the death is sure, its process group gone
		s.retire(old)
		r = <-started
	}
	nc, err = r.c, r.err
	if err != nil {
		reason := startFailure(err)
		if ask.ctx != nil && ask.ctx.Err() != nil {
			// The caller's context ended the start: no crash.
			se := &StartError{Module: h.name, Err: ask.ctx.Err()}
			if failed, ok := err.(*StartError); ok {
				se.pid, se.incarnation = failed.pid, failed.incarnation
			}
			err, reason = se, "restart"
		}
		if h.life.Err() == nil {
			h.postStartFailed(s.slot, reason, err)
		}
		ask.started(err)
		ask.finished(err)
		return nil, oldGone, err
	}
	h.postStarted(nc, ask.reason)
	s.install(nc)
	ask.started(nil)
	if oldGone {
		h.mu.Lock()
		h.restarts++
		h.mu.Unlock()
		ask.finished(nil)
		return nc, true, nil
	}
	h.drains.Add(1)
	drained := make(chan struct{})
	s.drained = drained
	go func() {
		defer h.drains.Done()
		h.drain(old, ask.reason, h.opts.ShutdownTimeout)
		close(drained)
		ask.finished(nil)
	}()
	return nc, false, nil
}

// restart starts a child for the slot after its child died (why says
// how, as an Event reason), with backoff, until one is ready or Shutdown
// begins, when it returns nil. The first start is early's, if not nil (see
// startEarly).
func (s *supervisor) restart(failures *int, why string, early <-chan startResult) *child {
	h := s.h
	for {
		var c *child
		var err error
		if early != nil {
			s.pause(0) // shows the start as due now, as a start without delay does
			r := <-early
			early = nil
			if c, err = r.c, r.err; err == nil {
				h.postStarted(c, why)
			}
		} else {
			d := h.restartDelay(*failures)
			if d > 0 {
				h.logf("backing off: %d children in a row died within %v of starting, or failed to start; the next start is in %v", *failures, stableUptime, d)
				h.post(Event{Kind: ModuleBackoff, Slot: s.slot, Reason: "backoff", Delay: d})
			}
			if !s.pause(d) {
				return nil
			}
			c, err = h.startChild(h.life, s.slot, why)
		}
		if err == nil {
			h.mu.Lock()
			h.restarts++
			h.mu.Unlock()
			s.install(c)
			return c
		}
		if h.life.Err() != nil {
			return nil
		}
		h.logf("restart failed: %v", err)
		h.postStartFailed(s.slot, startFailure(err), err)
		*failures++
		h.mu.Lock()
		h.lastExit = err.Error()
		h.restarts++
		h.mu.Unlock()
	}
}

// startFailure returns the Event reason of a failed start: "memory" for a
// child killed past MemoryMax before it was ready, else "crash".
func startFailure(err error) string {
	var ke *killedError
	if errors.As(err, &ke) {
		return ke.word
	}
	return "crash"
}

// restartDelay returns how long to wait before the next start, after the
// given number of failures in a row: children that died within stableUptime
// of becoming ready, and starts that failed. The first failure restarts at
// once; each further one doubles the delay from minRestartDelay up to
// Options.MaxRestartDelay.
func (h *Handle) restartDelay(failures int) time.Duration {
	if failures <= 1 {
		return 0
	}
	d := minRestartDelay
	for i := 2; i < failures && d < h.opts.MaxRestartDelay; i++ {
		d *= 2
	}
	return min(d, h.opts.MaxRestartDelay)
}

// pause waits d before a restart, advertising when the restart is due. It
// returns false if Shutdown began meanwhile.
func (s *supervisor) pause(d time.Duration) bool {
	h := s.h
	h.mu.Lock()
	s.retryAt = time.Now().Add(d)
	h.mu.Unlock()
	if d == 0 {
		return h.life.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case <-h.life.Done():
			return false
		case ask := <-s.asks:
			ask.started(nil) // no child to replace: the next is new anyway
			ask.finished(nil)
		}
	}
}

// retire takes the dead c out of its slot, reaps it, and reports how it
// ended.
func (s *supervisor) retire(c *child) {
	h := s.h
	c.retired = true
	degraded := s.uninstall(c)
	h.teardown(c)
	reason, word := c.endReason()
	tail := c.tail()
	logged := tail
	if word == "health" {
		logged = nil // logged with the reason for the kill
	}
	h.mu.Lock()
	h.lastExit = reason
	h.mu.Unlock()
	h.logf("child pid %d (incarnation %d) ended: %s; restarting.%s", c.proc.Pid(), c.incarnation, reason, formatTail(logged))
	h.postExited(c, word, tail)
	if degraded {
		h.post(Event{Kind: ModuleDegraded, Slot: c.slot, Reason: word})
	}
}

// endReason says how a child that has been reaped ended: in words for the
// log and Stats, and as an Event reason.
func (c *child) endReason() (reason, word string) {
	reason, word = fmt.Sprintf("%v", c.exitErr), "crash"
	if c.exitErr == nil {
		reason = "exit status 0"
	}
	var ke *killedError
	var pe *protocolError
	switch err := c.doneErr(); {
	case errors.As(err, &ke):
		reason, word = "killed "+ke.reason, ke.word
	case errors.As(err, &pe):
		reason, word = "killed after a "+pe.Error(), "protocol"
	}
	return reason, word
}

// exitError returns how the reaped c ended, as an error.
func (c *child) exitError() error {
	if err := c.doneErr(); err != nil && !errors.Is(err, errChildExited) {
		return err
	}
	if c.exitErr != nil {
		return c.exitErr
	}
	return errChildExited
}

// Bounds of the end of a drain. A child told to stop once its requests
// have drained ends the handlers whose requests were given up within
// stopGrace, then exits: the parent waits that long and stopSlack more
// before it kills it. At the end of a drain's grace, or of a Shutdown's
// context, the child's requests are canceled and it gets killGrace to exit
// by itself.
const (
	stopSlack = 2 * time.Second
	killGrace = 500 * time.Millisecond
)

// drain ends c gracefully, c having left its slot: c's ModuleFunc context
// is canceled, and once c's requests have ended, or grace has (if not
// zero), or Shutdown's context, c is told to stop, which cancels the
// requests left; c is killed if it does not exit in time. c's health checks
// go on throughout: a child that hangs is killed. drain returns once c has
// been reaped, and reports its end as an Event with reason, unless c died
// of something else meanwhile.
func (h *Handle) drain(c *child, reason string, grace time.Duration) {
	h.mu.Lock()
	c.state = "draining"
	idle := c.idleLocked()
	h.mu.Unlock()
	// Posted, as is the stop below: a hung child with a full pipe must
	// not hold the drain.
	c.post(outFrame{kind: kindDrain})
	var timeout <-chan time.Time
	if grace > 0 {
		t := time.NewTimer(grace)
		defer t.Stop()
		timeout = t.C
	}
	wait := stopGrace + stopSlack
	select {
	case <-idle:
	case <-timeout:
		wait = killGrace
		c.cutRunning()
	case <-h.kill:
		wait = killGrace
		c.cutRunning()
	case <-c.done:
	}
	stopped := false // c was stopped by the drain, not ended by something else
	select {
	case <-c.done:
	default:
		stopped = true
		c.endChecks()
		c.post(outFrame{kind: kindStop})
		c.stopWriting() // writeLoop flushes, then closes the child's stdin
		t := time.NewTimer(wait)
		defer t.Stop()
		kill := h.kill
	waiting:
		for {
			select {
			case <-c.exited:
				break waiting
			case <-kill:
				kill = nil
				t.Reset(killGrace)
				c.cutRunning()
			case <-t.C:
				c.condemn(&killedError{"as it did not exit in time at the end of a drain", reason})
				c.proc.Kill()
				break waiting
			}
		}
	}
	h.teardown(c)
	if !stopped {
		if _, word := c.endReason(); word != "crash" || c.exitErr != nil {
			reason = word
		}
	}
	h.postExited(c, reason, c.tail())
}

// drainTimeout bounds how long the parent waits, after a child has been
// reaped, for the child's pipes to reach end of file. Only a process that the
// module started and that outlived it can hold them open that long.
const drainTimeout = time.Second

// maxPidsKept bounds the pids a Handle remembers (see pidsStarted).
const maxPidsKept = 256

// startChild starts a child for slot and waits until it is ready. why is
// the reason of its ChildStarted event: "" for a first start, else why the
// child it follows had to go. On failure it leaves nothing running and
// returns a *StartError.
func (h *Handle) startChild(ctx context.Context, slot int, why string) (*child, error) {
	c, err := h.launchChild(ctx, slot)
	if err != nil {
		return nil, err
	}
	h.postStarted(c, why)
	return c, nil
}

// postStarted posts the ChildStarted event of c, which became ready.
func (h *Handle) postStarted(c *child, why string) {
	h.post(Event{Kind: ChildStarted, Pid: c.proc.Pid(), Incarnation: c.incarnation, Slot: c.slot, Reason: why})
}

// postExited posts the ChildExited of c, torn down, for reason (an Event
// reason word), with its exit status and output.
func (h *Handle) postExited(c *child, reason string, output []string) {
	h.post(Event{Kind: ChildExited, Pid: c.proc.Pid(), Incarnation: c.incarnation, Slot: c.slot, Reason: reason, Err: c.exitError(), Output: output})
}

// postStartFailed posts the ChildExited of a start for slot that failed
// with err, a *StartError, for reason: the child's, if one was started.
func (h *Handle) postStartFailed(slot int, reason string, err error) {
	ev := Event{Kind: ChildExited, Slot: slot, Reason: reason, Err: err}
	var se *StartError
	if errors.As(err, &se) {
		ev.Pid, ev.Incarnation, ev.Output = se.pid, se.incarnation, se.Output
	}
	h.post(ev)
}

// launchChild starts a child for the slot and waits until it is ready, as
// startChild does, but posts no event.
func (h *Handle) launchChild(ctx context.Context, slot int) (*child, error) {
	h.mu.Lock()
	incarnation := h.incarnation
	h.incarnation++
	h.mu.Unlock()
	proc, pipes, err := h.launch(slot, incarnation)
	if err != nil {
		return nil, &StartError{Module: h.name, Err: err}
	}
	conn := newConn(pipes.fromChild, pipes.toChild)
	conn.tryWrites(pipes.toChild)
	c := newChild(h, incarnation, proc, conn, pipes.accept)
	c.pipes = pipes
	c.ring, c.sendRing = pipes.rings.up, pipes.rings.down
	c.slot = slot
	c.source = h.capture.NewSource(h.sourceLabel(slot, proc.Pid()))
	h.mu.Lock()
	if len(h.pids) == maxPidsKept {
		h.pids = append(h.pids[:0], h.pids[1:]...)
	}
	h.pids = append(h.pids, proc.Pid())
	c.state = "starting"
	h.kids = append(h.kids, c)
	h.mu.Unlock()
	c.logs.Add(3)
	go h.copyLog(c, logcapture.Log, pipes.log)
	go h.copyLog(c, logcapture.Out, pipes.stdout)
	go h.copyLog(c, logcapture.Err, pipes.stderr)
	// The hello, which carries the Config, may be larger than the pipe
	// holds: writeLoop writes it, so that a child that never reads it
	// (frozen, or hung in an init function) holds nothing but writeLoop,
	// until StartTimeout or ctx has teardown kill it.
	c.queue(outFrame{kind: kindHello, msg: &hello{
		Name:        h.name,
		Incarnation: c.incarnation,
		Slot:        slot,
		Config:      h.opts.Config,
		LogDir:      h.opts.LogDir,
	}})
	go c.waitLoop()
	go c.writeLoop()
	go c.readLoop()

	timer := time.NewTimer(h.opts.StartTimeout)
	defer timer.Stop()
	// MemoryMax holds from the fork: a ModuleFunc may take memory too.
	// Until the child is ready, the pages of its binary that its package
	// initialisation touched are still resident (it drops them once
	// ready; see Options.MemoryHigh): only what it allocated counts.
	var memoryCheck <-chan time.Time
	if h.opts.MemoryMax > 0 {
		t := time.NewTicker(h.opts.HealthInterval)
		defer t.Stop()
		memoryCheck = t.C
	}
wait:
	for {
		select {
		case err = <-c.ready:
		case <-c.exited:
			// The child died; readLoop reports how once it reaches the
			// end of the pipe.
			err = <-c.ready
		case <-timer.C:
			err = ErrStartTimeout
		case <-ctx.Done():
			err = ctx.Err()
		case <-memoryCheck:
			m := c.proc.AnonMemory()
			if m <= h.opts.MemoryMax {
				continue
			}
			err = h.killedForMemory(c, m, "before it was ready, as the memory it allocated")
		}
		break wait
	}
	if err == nil {
		h.mu.Lock()
		c.readyAt = time.Now()
		h.mu.Unlock()
		if n := h.opts.MaxRequests; n > 0 {
			c.maxRequests = uint64(max(1, jitter(n)))
		}
		c.monitored = make(chan struct{})
		go h.monitor(c)
		c.startExitWatch()
		return c, nil
	}
	h.teardown(c)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		var ee *exec.ExitError
		switch {
		case c.exitErr == nil:
			err = errors.New("the child exited before it was ready (exit status 0): does main (or TestMain) call subproc.Main first? In tests, use subproctest.Main(m)")
		case errors.As(c.exitErr, &ee) && ee.ExitCode() < 0:
			// Ended by a signal, maybe the parent's own kill once the
			// pipe had closed: the status alone does not say the child
			// exited.
			err = fmt.Errorf("the child's protocol pipe (its stdout) closed before it was ready; the child ended with %v", c.exitErr)
		default:
			err = fmt.Errorf("the child exited before it was ready (%v)", c.exitErr)
		}
	}
	return nil, &StartError{Module: h.name, Err: err, Output: c.tail(), pid: c.proc.Pid(), incarnation: c.incarnation}
}

// sourceLabel returns what marks the output of the child in slot with pid
// (see logcapture.Capture.NewSource): nothing for a pool of one, whose
// output is the module's as it always was.
func (h *Handle) sourceLabel(slot, pid int) string {
	if h.opts.Children <= 1 {
		return ""
	}
	return fmt.Sprintf("slot %d pid %d", slot, pid)
}

// copyLog copies one of the child's output pipes into the module's logs.
func (h *Handle) copyLog(c *child, s logcapture.Stream, f *os.File) {
	defer c.logs.Done()
	c.source.Copy(s, f)
}

// teardown kills c if it still runs, reaps it, and waits for every goroutine
// that served it. Requests still pending on c fail. It takes c off the
// handle's list of children.
//
// Once c is reaped, every wait is bounded by drainTimeout in all: a process
// that the module started may hold any of c's pipes open, and never read
// or write them.
func (h *Handle) teardown(c *child) {
	c.proc.Kill()
	<-c.exited
	c.stopExitWatch()
	expired := make(chan struct{})
	drained := time.AfterFunc(drainTimeout, func() { close(expired) })
	defer drained.Stop()
	// await waits for done; once drainTimeout has passed, it calls force,
	// which closes what done waits on, and waits on.
	await := func(done <-chan struct{}, force func()) {
		select {
		case <-done:
		case <-expired:
			force()
			<-done
		}
	}
	// Something else may hold the child's stdout open; then the reader
	// stops reading it.
	await(c.done, func() { c.pipes.fromChild.Close() })
	// Or its stdin, while a sender's write, or writeLoop's last one, waits
	// for room in the pipe: the close makes it fail.
	c.stopWriting()
	await(c.wdone, func() { c.pipes.toChild.Close() })
	// Or its output pipes.
	logsDone := make(chan struct{})
	go func() {
		c.logs.Wait()
		close(logsDone)
	}()
	await(logsDone, c.pipes.closeReaders)
	c.pipes.closeReaders()
	c.accept.close() // readLoop, done, has read it
	if c.monitored != nil {
		<-c.monitored
	}
	h.mu.Lock()
	for i, k := range h.kids {
		if k == c {
			h.kids = append(h.kids[:i], h.kids[i+1:]...)
			break
		}
	}
	c.state = "exited"
	h.notifyLocked()
	h.mu.Unlock()
}
