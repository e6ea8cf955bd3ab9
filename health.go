package subproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/fbbf71ac/subproc/internal/logcapture"
)

// This file holds the supervision of a module: starting a child, watching it
// with health checks, noticing its death, restarting it with backoff, and
// stopping it at shutdown.

// drainTimeout bounds how long the parent waits, after a child has been
// reaped, for the child's pipes to reach end of file. Only a process that the
// module started and that outlived it can hold them open that long.
const drainTimeout = time.Second

// maxPidsKept bounds the pids a Handle remembers (see pidsStarted).
const maxPidsKept = 256

// Restart backoff: see Options.MaxRestartDelay.
const minRestartDelay = 100 * time.Millisecond

// startChild starts the next incarnation and waits until it is ready. On
// failure it leaves nothing running and returns a *StartError.
func (h *Handle) startChild(ctx context.Context) (*child, error) {
	proc, pipes, err := h.spawn()
	if err != nil {
		return nil, &StartError{Module: h.name, Err: err}
	}
	c := newChild(h, h.incarnation, proc, newConn(pipes.fromChild, pipes.toChild), pipes.accept)
	c.pipes = pipes
	h.incarnation++
	h.capture.ResetTail() // the tail now speaks of this incarnation only
	h.mu.Lock()
	if len(h.pids) == maxPidsKept {
		h.pids = append(h.pids[:0], h.pids[1:]...)
	}
	h.pids = append(h.pids, proc.Pid())
	h.mu.Unlock()
	c.logs.Add(3)
	go h.copyLog(c, logcapture.Log, pipes.log)
	go h.copyLog(c, logcapture.Out, pipes.stdout)
	go h.copyLog(c, logcapture.Err, pipes.stderr)
	go c.waitLoop()
	go c.writeLoop()
	go c.readLoop()
	c.send(outFrame{kind: kindHello, msg: &hello{
		Name:        h.name,
		Incarnation: c.incarnation,
		Config:      h.opts.Config,
		LogDir:      h.opts.LogDir,
	}}, nil)

	timer := time.NewTimer(h.opts.StartTimeout)
	defer timer.Stop()
	select {
	case err = <-c.ready:
	case <-c.exited:
		// The child died; readLoop reports how once it reaches the end
		// of the pipe.
		err = <-c.ready
	case <-timer.C:
		err = ErrStartTimeout
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err == nil {
		return c, nil
	}
	h.teardown(c)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		var ee *exec.ExitError
		switch {
		case c.exitErr == nil:
			err = errors.New("the child exited before it was ready (exit status 0)")
		case errors.As(c.exitErr, &ee) && ee.ExitCode() < 0:
			// Ended by a signal, maybe the parent's own kill once the
			// pipe had closed: the status alone does not say the child
			// exited.
			err = fmt.Errorf("the child's protocol pipe (its stdout) closed before it was ready; the child ended with %v", c.exitErr)
		default:
			err = fmt.Errorf("the child exited before it was ready (%v)", c.exitErr)
		}
	}
	return nil, &StartError{Module: h.name, Err: err, Output: h.capture.Tail()}
}

// copyLog copies one of the child's output pipes into the module's logs.
func (h *Handle) copyLog(c *child, s logcapture.Stream, f *os.File) {
	defer c.logs.Done()
	h.capture.Copy(s, f)
}

// teardown kills c if it still runs, reaps it, and waits for every goroutine
// that served it. Requests still pending on c fail.
func (h *Handle) teardown(c *child) {
	c.proc.Kill()
	<-c.exited
	drained := time.NewTimer(drainTimeout)
	defer drained.Stop()
	select {
	case <-c.done:
	case <-drained.C:
		// Something else holds the child's stdout open; stop reading it.
		c.pipes.fromChild.Close()
		<-c.done
	}
	c.stopWriting()
	<-c.wdone
	logsDone := make(chan struct{})
	go func() {
		c.logs.Wait()
		close(logsDone)
	}()
	select {
	case <-logsDone:
	case <-drained.C:
		c.pipes.closeReaders()
		<-logsDone
	}
	c.pipes.closeReaders()
	c.accept.close() // readLoop, done, has read it
}

// superviseLoop watches the running child and replaces it when it dies or
// hangs, until Shutdown. It returns when the last child has been reaped.
func (h *Handle) superviseLoop(c *child) {
	defer h.finish()
	failures := 0 // children in a row that died young, or failed to start
	for {
		if h.watch(c) {
			h.teardown(c)
			return
		}
		h.retire(c)
		if c.uptime() >= stableUptime {
			failures = 0
		}
		failures++
		for c = nil; c == nil; {
			d := h.restartDelay(failures)
			if d > 0 {
				h.logf("backing off: %d children in a row died within %v of starting, or failed to start; the next start is in %v", failures, stableUptime, d)
			}
			if !h.pause(d) {
				return
			}
			nc, err := h.startChild(h.life)
			if err != nil {
				if h.life.Err() != nil {
					return
				}
				h.logf("restart failed: %v", err)
				failures++
				h.mu.Lock()
				h.lastExit = err.Error()
				h.restarts++
				h.mu.Unlock()
				continue
			}
			c = nc
		}
		h.mu.Lock()
		h.restarts++
		h.mu.Unlock()
		h.install(c)
	}
}

// stableUptime is how long a child must have served for its death to count
// as a single crash of a healthy module, which restarts at once, rather
// than one more of a module that keeps dying, which backs off.
const stableUptime = time.Second

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
func (h *Handle) pause(d time.Duration) bool {
	h.mu.Lock()
	h.retryAt = time.Now().Add(d)
	h.mu.Unlock()
	if d == 0 {
		return h.life.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-h.closing:
		return false
	}
}

// Bounds of the end of a drain. A child told to stop once its requests
// have drained ends the handlers whose requests were given up within
// stopGrace, then exits: the parent waits that long and stopSlack more
// before it kills it. At the end of a Shutdown's context, the child's
// requests are canceled and it gets killGrace to exit by itself.
const (
	stopSlack = 2 * time.Second
	killGrace = 500 * time.Millisecond
)

// watch supervises c until it has ended, and reports whether it ended
// because the handle shut down. It health-checks c throughout, and kills it
// when HealthFailures checks in a row fail. When Shutdown begins, it drains
// c: c takes no new requests, its ModuleFunc's context is canceled, and
// once the requests in flight have ended, or Shutdown's context has, c is
// told to stop; if it does not exit in time, it is killed.
func (h *Handle) watch(c *child) (shutdown bool) {
	tick := time.NewTicker(h.opts.HealthInterval)
	defer tick.Stop()
	var (
		checks  chan error      // the outcome of the health check under way; nil when none is
		closing = h.closing     // nil once the drain has begun
		drained <-chan struct{} // while draining: closed when the last request has ended
		kill    <-chan struct{} // while draining: closed when Shutdown's context ends
		stopped *time.Timer     // once told to stop: fires when it is time to kill c
		expired <-chan time.Time
	)
	defer func() {
		if stopped != nil {
			stopped.Stop()
		}
		if checks != nil {
			<-checks // it ends with c's pipe, if not before
		}
	}()
	var stopAt time.Time // when stopped fires
	stop := func(wait time.Duration) {
		drained = nil
		if stopped != nil {
			if at := time.Now().Add(wait); at.Before(stopAt) {
				stopAt = at
				stopped.Reset(wait)
			}
			return
		}
		// Sent from a goroutine of its own, as a sender may end up
		// writing to the pipe: a hung child with a full pipe must not
		// hold the drain in that write.
		go func() {
			c.send(outFrame{kind: kindStop}, h.kill)
			c.stopWriting() // writeLoop flushes, then closes the child's stdin
		}()
		stopAt = time.Now().Add(wait)
		stopped = time.NewTimer(wait)
		expired = stopped.C
	}
	for {
		select {
		case <-c.done:
			return closing == nil
		case <-c.exited:
			return closing == nil
		case <-closing:
			closing = nil
			h.uninstall(c, "stopping")
			go c.send(outFrame{kind: kindDrain}, h.kill)
			drained, kill = h.drained, h.kill
		case <-drained:
			stop(stopGrace + stopSlack)
		case <-kill:
			kill = nil
			stop(killGrace)
		case <-expired:
			expired = nil
			c.condemn(&killedError{"at shutdown, as it did not exit in time"})
			c.proc.Kill()
		case <-tick.C:
			if checks == nil && stopped == nil {
				checks = make(chan error, 1)
				go func() { checks <- h.check(c) }()
			}
		case err := <-checks:
			checks = nil
			if err == nil || h.failedCheck(c, err) {
				continue
			}
			c.proc.Kill()
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
	if h.cur == c && h.state == "unhealthy" {
		h.state = "running"
	}
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
	if h.cur == c && h.state == "running" {
		h.state = "unhealthy"
	}
	h.mu.Unlock()
	if failed < h.opts.HealthFailures {
		h.logf("health check %d of %d failed for child pid %d: %v", failed, h.opts.HealthFailures, c.proc.Pid(), err)
		return true
	}
	h.logf("child pid %d (incarnation %d) is unhealthy: %d health checks in a row failed (%v); killing it.%s",
		c.proc.Pid(), c.incarnation, failed, err, formatTail(h.capture.Tail()))
	c.condemn(&killedError{fmt.Sprintf("after failing %d health checks in a row", failed)})
	return false
}

// A killedError is why the parent killed a child; the requests the child
// had in flight fail with it.
type killedError struct{ reason string }

func (e *killedError) Error() string { return "the child was killed " + e.reason }

// retire takes a dead or dying c out of service, reaps it, and logs how it
// ended with the last lines of its output.
func (h *Handle) retire(c *child) {
	h.uninstall(c, "restarting")
	h.teardown(c)
	reason := fmt.Sprintf("%v", c.exitErr)
	if c.exitErr == nil {
		reason = "exit status 0"
	}
	tail := formatTail(h.capture.Tail())
	var ke *killedError
	var pe *protocolError
	switch err := c.doneErr(); {
	case errors.As(err, &ke):
		reason = "killed " + ke.reason
		tail = "" // logged with the reason for the kill
	case errors.As(err, &pe):
		reason = "killed after a " + pe.Error()
	}
	h.mu.Lock()
	h.lastExit = reason
	h.mu.Unlock()
	h.logf("child pid %d (incarnation %d) ended: %s; restarting.%s", c.proc.Pid(), c.incarnation, reason, tail)
}

// finish releases what the handle holds once its last child is reaped.
func (h *Handle) finish() {
	close(h.spawns)
	<-h.spawnDone
	h.capture.Close()
	h.mu.Lock()
	h.state = "stopped"
	h.cur = nil
	h.mu.Unlock()
	close(h.done)
}

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
