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
	failures := 0 // children in a row that ended before answering anything
	for {
		if h.watch(c) {
			h.stop(c)
			return
		}
		h.retire(c)
		if c.served.Load() {
			failures = 0
		} else {
			failures++
		}
		for c = nil; c == nil; {
			if !h.pause(h.restartDelay(failures)) {
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

// restartDelay returns how long to wait before the next start, after the
// given number of children in a row that died without answering anything.
func (h *Handle) restartDelay(failures int) time.Duration {
	if failures == 0 {
		return 0
	}
	d := minRestartDelay
	for i := 1; i < failures && d < h.opts.MaxRestartDelay; i++ {
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

// watch health-checks c until it dies or is killed for failing its checks,
// which it returns false for, or until Shutdown begins, which it returns
// true for.
func (h *Handle) watch(c *child) (shutdown bool) {
	tick := time.NewTicker(h.opts.HealthInterval)
	defer tick.Stop()
	failed := 0
	for {
		select {
		case <-c.done:
			return false
		case <-c.exited:
			return false
		case <-h.closing:
			return true
		case <-tick.C:
		}
		timeout := make(chan struct{})
		t := time.AfterFunc(h.opts.HealthTimeout, func() { close(timeout) })
		rtt, err := c.ping(timeout)
		t.Stop()
		if err == nil {
			failed = 0
			c.served.Store(true)
			h.mu.Lock()
			h.lastRTT = rtt
			h.mu.Unlock()
			continue
		}
		select {
		case <-c.done:
			return false
		case <-h.closing:
			return true
		default:
		}
		failed++
		if failed < h.opts.HealthFailures {
			h.logf("health check %d of %d failed for child pid %d: %v", failed, h.opts.HealthFailures, c.proc.Pid(), err)
			continue
		}
		h.logf("child pid %d (incarnation %d) is unhealthy: %d health checks in a row failed (%v); killing it.%s",
			c.proc.Pid(), c.incarnation, failed, err, formatTail(h.capture.Tail()))
		c.unhealthy.Store(true)
		c.proc.Kill()
		return false
	}
}

// retire takes a dead or dying c out of service and reaps it.
func (h *Handle) retire(c *child) {
	h.uninstall(c, "restarting")
	h.teardown(c)
	reason := fmt.Sprintf("%v", c.exitErr)
	if c.exitErr == nil {
		reason = "exit status 0"
	}
	if c.unhealthy.Load() {
		reason = "killed after failing health checks"
	} else if err := c.doneErr(); err != nil {
		var pe *protocolError
		if errors.As(err, &pe) {
			reason = "killed after a " + pe.Error()
		}
	}
	h.mu.Lock()
	h.lastExit = reason
	h.mu.Unlock()
	h.logf("child pid %d (incarnation %d) ended: %s; restarting.%s", c.proc.Pid(), c.incarnation, reason, formatTail(h.capture.Tail()))
}

// stop ends c at shutdown: once in-flight requests have drained, the child
// is told to stop; if the shutdown's context ends first, it is killed.
func (h *Handle) stop(c *child) {
	select {
	case <-h.drained:
	case <-h.kill:
	case <-c.exited:
	}
	h.uninstall(c, "stopping")
	// Sent from a goroutine of its own, as a sender may end up writing to
	// the pipe: a hung child with a full pipe must not hold the stop in
	// that write, past the Shutdown context that would kill it.
	go func() {
		c.send(outFrame{kind: kindStop}, h.kill)
		c.stopWriting() // writeLoop flushes, then closes the child's stdin
	}()
	select {
	case <-c.exited:
	case <-h.kill:
	}
	h.teardown(c)
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
