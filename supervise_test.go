package subproc

// Table tests of supervision with fake children: the launcher seam starts,
// instead of a process, a goroutine that speaks the child's side of the
// protocol over real pipes and misbehaves as each case says. They check
// backoff, health kills, replacements that fail, and that a slot's
// trouble stays in its slot, without the cost of real processes.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeBehaviour says how a fake child behaves.
type fakeBehaviour struct {
	initErr  string        // fail the start with this init error
	dieAfter time.Duration // if not zero: exit this long after ready
	hang     bool          // after ready, read nothing more (health checks fail)
	// holdStderr, if not nil, keeps the child's stderr open after its
	// death until it is closed, as a process the module started and
	// that outlived it would.
	holdStderr <-chan struct{}
	// holdStdin, if not nil, keeps the read end of the child's stdin
	// open, unread, after its death until it is closed.
	holdStdin <-chan struct{}
	// holdStdout likewise keeps a copy of the write end of its protocol
	// stdout.
	holdStdout <-chan struct{}
	// readyAt, if not nil, holds the child's ready until it is closed.
	readyAt <-chan struct{}
}

// fakeChildren launches fake children, each behaving as behave says for
// its slot and incarnation, and records when each started.
type fakeChildren struct {
	behave func(slot, incarnation int) fakeBehaviour

	mu     sync.Mutex
	starts []fakeStart
	live   sync.WaitGroup
}

type fakeStart struct {
	slot, incarnation int
	at                time.Time
}

// startsOf returns the starts recorded so far.
func (f *fakeChildren) startsOf() []fakeStart {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakeStart(nil), f.starts...)
}

// fakeProc is a fake child's process: Kill ends it, Wait waits for it.
type fakeProc struct {
	pid    int
	kill   chan struct{} // closed by Kill
	once   sync.Once
	exited chan struct{} // closed when the fake child's goroutine has ended
}

func (p *fakeProc) Pid() int          { return p.pid }
func (p *fakeProc) Wait() error       { <-p.exited; return nil }
func (p *fakeProc) Kill()             { p.once.Do(func() { close(p.kill) }) }
func (p *fakeProc) Quit() bool        { return false }
func (p *fakeProc) Memory() int64     { return 0 }
func (p *fakeProc) AnonMemory() int64 { return 0 }

var fakePids atomic.Int64

// launch is a launcher.
func (f *fakeChildren) launch(slot, incarnation int) (process, *childPipes, error) {
	var parent, child [5]*os.File // to, from, stdout, stderr, log
	for i := range parent {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, nil, err
		}
		if i == 0 {
			parent[i], child[i] = w, r
		} else {
			parent[i], child[i] = r, w
		}
	}
	f.mu.Lock()
	f.starts = append(f.starts, fakeStart{slot, incarnation, time.Now()})
	f.mu.Unlock()
	p := &fakeProc{pid: 1_000_000 + int(fakePids.Add(1)), kill: make(chan struct{}), exited: make(chan struct{})}
	accept := newLocalWord()
	b := f.behave(slot, incarnation)
	var held *os.File // a copy of the protocol stdout's write end, for holdStdout
	if b.holdStdout != nil {
		sc, err := child[1].SyscallConn()
		if err != nil {
			return nil, nil, err
		}
		sc.Control(func(fd uintptr) {
			if nfd, err := syscall.Dup(int(fd)); err == nil {
				held = os.NewFile(uintptr(nfd), "held stdout")
			}
		})
	}
	f.live.Add(1)
	go func() {
		defer f.live.Done()
		f.serve(p, child[0], child[1], accept, b)
		for i, c := range child {
			if !(i == 3 && b.holdStderr != nil || i == 0 && b.holdStdin != nil) {
				c.Close()
			}
		}
		close(p.exited)
		if b.holdStderr != nil {
			<-b.holdStderr
			child[3].Close()
		}
		if b.holdStdin != nil {
			<-b.holdStdin
			child[0].Close()
		}
		if held != nil {
			<-b.holdStdout
			held.Close()
		}
	}()
	return p, &childPipes{toChild: parent[0], fromChild: parent[1], stdout: parent[2], stderr: parent[3], log: parent[4], accept: accept}, nil
}

// serve is the fake child: it answers the handshake, then serves an
// echo of its identity until it is killed or its behaviour ends it.
func (f *fakeChildren) serve(p *fakeProc, in, out *os.File, accept *acceptWord, b fakeBehaviour) {
	// Whatever ends the child closes its pipes: the parent sees it die.
	go func() {
		<-p.kill
		if b.holdStdin == nil {
			in.Close()
		}
		out.Close()
	}()
	c := newConn(in, out)
	if frame.ReadPreamble(c.fr.Buffered(), protocolVersion) != nil {
		return
	}
	hdr, err := c.fr.ReadHeader()
	var hi hello
	if err != nil || c.readMessage(hdr.Len, new([]byte), &hi) != nil {
		return
	}
	go c.writeLoop()
	defer func() {
		c.stopWriting()
		<-c.wdone
	}()
	if b.readyAt != nil {
		select {
		case <-b.readyAt:
		case <-p.kill:
			return
		}
	}
	if b.initErr != "" {
		c.send(outFrame{kind: kindReady, msg: &ready{Pid: p.pid, Err: b.initErr}}, nil)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := newServer(ctx, nil, c, accept, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "slot=%d inc=%d", hi.Slot, hi.Incarnation)
	}))
	c.send(outFrame{kind: kindReady, msg: &ready{Pid: p.pid}}, nil)
	if b.hang {
		<-p.kill
		return
	}
	done := make(chan error, 1)
	go func() { done <- srv.readLoop() }()
	var die <-chan time.Time
	if b.dieAfter > 0 {
		die = time.After(b.dieAfter)
	}
	select {
	case <-done:
	case <-die:
		p.Kill()
		<-done
	case <-p.kill:
		<-done
	}
	srv.active.Wait()
}

// killDuringReplacement starts h.Restart, kills the old child while its
// replacement (the second start of f) starts, and waits until the old
// child has left its slot. It returns Restart's outcome, to come.
func killDuringReplacement(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) <-chan error {
	t.Helper()
	old := firstChild(h)
	restarted := make(chan error, 1)
	go func() { restarted <- h.Restart(context.Background()) }()
	waitFor(t, 10*time.Second, "the replacement to start", func() bool { return len(f.startsOf()) == 2 })
	old.proc.Kill()
	waitFor(t, 10*time.Second, "the dead child to leave its slot", func() bool { return !h.Ready() })
	return restarted
}

// startFake starts a Handle on fake children; it is shut down when the test
// ends.
func startFake(t *testing.T, f *fakeChildren, opts Options) (*Handle, error) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = discardLogger()
	}
	h, err := start(context.Background(), "fake", opts, f.launch)
	if err == nil {
		t.Cleanup(func() {
			h.Close()
			f.live.Wait()
		})
	}
	return h, err
}

func TestSuperviseFake(t *testing.T) {
	const maxDelay = 400 * time.Millisecond
	stderrHeld := make(chan struct{}) // a fakeBehaviour.holdStderr, closed by its case's check
	stdinHeld := make(chan struct{})  // a fakeBehaviour.holdStdin, likewise
	bothHeld := make(chan struct{})   // holdStdout and holdStderr together
	replacementReady := make(chan struct{})
	crashStderrHeld := make(chan struct{})
	failingReady := make(chan struct{})
	youngReady := make(chan struct{})
	for _, tc := range []struct {
		name   string
		opts   Options
		behave func(slot, incarnation int) fakeBehaviour
		check  func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog)
	}{{
		name: "children that die young back off",
		opts: Options{MaxRestartDelay: maxDelay},
		behave: func(slot, inc int) fakeBehaviour {
			return fakeBehaviour{dieAfter: 10 * time.Millisecond}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			waitFor(t, 20*time.Second, "7 starts", func() bool { return len(f.startsOf()) >= 7 })
			starts := f.startsOf()
			// The delay before start i+1: none after the first death, then
			// 100ms doubling up to maxDelay.
			for i, want := range []time.Duration{0, 100, 200, 400, 400} {
				gap := starts[i+2].at.Sub(starts[i+1].at)
				want *= time.Millisecond
				assert.GreaterOrEqual(t, gap, want, "gap before start %d", i+2)
				assert.Less(t, gap, want+2*time.Second, "gap before start %d", i+2)
			}
			assert.GreaterOrEqual(t, events.count(ModuleBackoff, "backoff"), 4)
		},
	}, {
		// A child that served, then was replaced gracefully, ends the
		// crash loop before it: its replacement's single crash restarts
		// at once.
		name: "a child replaced after it served resets the backoff",
		opts: Options{MaxRestartDelay: 2 * time.Second, HealthInterval: time.Hour},
		behave: func(slot, inc int) fakeBehaviour {
			if inc < 5 || inc == 6 {
				return fakeBehaviour{dieAfter: 10 * time.Millisecond}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			awaitStats(t, h, 20*time.Second, "incarnation 5 running", runningInc(5))
			time.Sleep(stableUptime) // incarnation 5 serves that long
			backoffs := events.count(ModuleBackoff, "")
			require.NoError(t, h.Restart(context.Background())) // to incarnation 6, which dies young
			waitFor(t, 20*time.Second, "incarnation 7 to start", func() bool { return len(f.startsOf()) >= 8 })
			starts := f.startsOf()
			assert.Less(t, starts[7].at.Sub(starts[6].at), time.Second, "the delay before the restart after a single crash (2s without the reset)")
			assert.Equal(t, backoffs, events.count(ModuleBackoff, ""), "backoff events after the single crash")
		},
	}, {
		name: "a hung child is killed after its failed checks",
		opts: Options{HealthInterval: 20 * time.Millisecond, HealthTimeout: 20 * time.Millisecond, HealthFailures: 3},
		behave: func(slot, inc int) fakeBehaviour {
			return fakeBehaviour{hang: inc == 0}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			waitFor(t, 20*time.Second, "a second child", func() bool {
				st := h.Stats()
				return st.State == "running" && st.Incarnation == 1
			})
			assert.Equal(t, 3, events.count(ChildUnhealthy, "health"))
			ev := events.first(ChildExited)
			assert.Equal(t, "health", ev.Reason)
			var ke *killedError
			assert.True(t, errors.As(ev.Err, &ke), "ChildExited.Err = %v", ev.Err)
			assert.Contains(t, h.Stats().LastExit, "3 health checks")
		},
	}, {
		name: "a replacement that fails to start leaves the old child",
		opts: Options{Children: 2},
		behave: func(slot, inc int) fakeBehaviour {
			if inc >= 2 {
				return fakeBehaviour{initErr: "no more"}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			before := h.Stats().Children
			err := h.Restart(context.Background())
			var se *StartError
			require.True(t, errors.As(err, &se), "Restart: %v", err)
			assert.Contains(t, err.Error(), "no more")
			after := h.Stats().Children
			assert.Equal(t, pidsOf(before), pidsOf(after))
			assert.Equal(t, 1, events.count(ChildRecycling, "restart"), "the second slot is not tried after the first failed")
		},
	}, {
		// The old child dies while its replacement starts: it is
		// reported and counted as a crash at once, the module as
		// degraded meanwhile, and the replacement takes the slot. Its
		// teardown takes a while (a process it started holds its
		// stderr), during which the replacement becomes ready: the
		// replacement's ChildStarted still comes after the crash's
		// events, as after a restart.
		name: "a crash while the replacement starts",
		behave: func(slot, inc int) fakeBehaviour {
			switch inc {
			case 0:
				return fakeBehaviour{holdStderr: crashStderrHeld}
			case 1:
				return fakeBehaviour{readyAt: replacementReady}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			defer close(crashStderrHeld)
			restarted := killDuringReplacement(t, h, f, events)
			close(replacementReady)
			require.NoError(t, <-restarted)
			awaitStats(t, h, 10*time.Second, "the replacement running", runningInc(1))
			st := h.Stats()
			assert.Equal(t, 1, st.Restarts)
			assert.NotEmpty(t, st.LastExit)
			waitFor(t, 10*time.Second, "five events", func() bool { return len(events.kinds()) >= 5 })
			assert.Equal(t, []string{"ChildStarted ", "ChildRecycling restart", "ChildExited crash", "ModuleDegraded crash", "ChildStarted restart"}, events.kinds())
			assert.Equal(t, 2, len(f.startsOf()), "no other start")
		},
	}, {
		// The old child dies while its replacement starts, and the
		// replacement dies young: two deaths in a row, so the next start
		// backs off. (The first death was not counted.)
		name: "a crash while the replacement starts counts toward the backoff",
		opts: Options{MaxRestartDelay: maxDelay},
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 1 {
				return fakeBehaviour{readyAt: youngReady, dieAfter: 10 * time.Millisecond}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			restarted := killDuringReplacement(t, h, f, events)
			close(youngReady)
			require.NoError(t, <-restarted)
			awaitStats(t, h, 10*time.Second, "the third child running", runningInc(2))
			require.Equal(t, 1, events.count(ModuleBackoff, "backoff"), "events: %v", events.kinds())
			assert.Equal(t, minRestartDelay, events.first(ModuleBackoff).Delay)
		},
	}, {
		// The same, but the replacement fails to start: the slot
		// restarts, as after any death.
		name: "a crash while the replacement starts, which fails",
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 1 {
				return fakeBehaviour{readyAt: failingReady, initErr: "no"}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			restarted := killDuringReplacement(t, h, f, events)
			close(failingReady)
			var se *StartError
			require.ErrorAs(t, <-restarted, &se)
			awaitStats(t, h, 10*time.Second, "the restarted child running", runningInc(2))
			assert.Equal(t, 1, h.Stats().Restarts)
			waitFor(t, 10*time.Second, "six events", func() bool { return len(events.kinds()) >= 6 })
			assert.Equal(t, []string{"ChildStarted ", "ChildRecycling restart", "ChildExited crash", "ModuleDegraded crash", "ChildExited crash", "ChildStarted crash"}, events.kinds())
			var failed []Event
			for _, ev := range events.all() {
				if ev.Kind == ChildExited {
					failed = append(failed, ev)
				}
			}
			require.Len(t, failed, 2)
			assert.Equal(t, 1, failed[1].Incarnation, "the failed replacement's exit")
			assert.NotZero(t, failed[1].Pid, "the failed replacement's exit")
			assert.NotEqual(t, failed[0].Pid, failed[1].Pid, "the two exits are of two children")
		},
	}, {
		// Restart's context ends while the replacement starts: Restart
		// returns the *StartError, the event says the restart ended it,
		// not a crash, and the old child serves on.
		name: "a restart whose context ends",
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 1 {
				return fakeBehaviour{readyAt: make(chan struct{})} // never ready
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			ctx, cancel := context.WithCancel(context.Background())
			restarted := make(chan error, 1)
			go func() { restarted <- h.Restart(ctx) }()
			waitFor(t, 10*time.Second, "the replacement to start", func() bool { return len(f.startsOf()) == 2 })
			cancel()
			err := <-restarted
			var se *StartError
			require.ErrorAs(t, err, &se)
			assert.ErrorIs(t, err, context.Canceled)
			waitFor(t, 10*time.Second, "three events", func() bool { return len(events.kinds()) >= 3 })
			assert.Equal(t, []string{"ChildStarted ", "ChildRecycling restart", "ChildExited restart"}, events.kinds())
			exited := events.first(ChildExited)
			assert.Equal(t, 1, exited.Incarnation, "the replacement's exit")
			assert.NotZero(t, exited.Pid, "the replacement's exit")
			assert.Equal(t, 0, h.Stats().Incarnation, "the child serving")
		},
	}, {
		name: "one slot's crash loop stays in its slot",
		opts: Options{Children: 3, MaxRestartDelay: maxDelay},
		behave: func(slot, inc int) fakeBehaviour {
			if slot == 1 {
				return fakeBehaviour{dieAfter: 10 * time.Millisecond}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			waitFor(t, 20*time.Second, "slot 1 restarted 4 times", func() bool {
				n := 0
				for _, s := range f.startsOf() {
					if s.slot == 1 {
						n++
					}
				}
				return n >= 5
			})
			for _, s := range f.startsOf() {
				if s.slot != 1 {
					assert.Less(t, s.incarnation, 3, "slot %d was restarted", s.slot)
				}
			}
			assert.Zero(t, events.count(ModuleDegraded, ""), "two slots served throughout")
			assert.True(t, h.Ready())
		},
	}, {
		// The dead child's teardown waits drainTimeout for its stderr;
		// its replacement starts meanwhile, and its ChildStarted still
		// follows the dead child's ChildExited.
		name: "a restart does not wait for the dead child's teardown",
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 0 {
				return fakeBehaviour{dieAfter: 10 * time.Millisecond, holdStderr: stderrHeld}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			defer close(stderrHeld)
			waitFor(t, 20*time.Second, "the second child's ChildStarted", func() bool {
				return events.count(ChildStarted, "") >= 2
			})
			starts := f.startsOf()
			exited := events.first(ChildExited)
			assert.True(t, starts[1].at.Before(exited.Time), "the second child started %v after the first one's ChildExited", starts[1].at.Sub(exited.Time))
			assert.GreaterOrEqual(t, exited.Time.Sub(starts[0].at), drainTimeout, "the first child's teardown waited for its stderr")
			assert.Equal(t, []string{"ChildStarted ", "ChildExited crash", "ModuleDegraded crash", "ChildStarted crash"}, events.kinds())
		},
	}, {
		// Requests wait in the parent's write to a child that reads
		// nothing; the child dies, and its stdin stays open, unread. The
		// teardown stops waiting for the write after drainTimeout, and the
		// replacement is installed: the requests, which the dead child
		// never took, are served by it.
		name: "a dead child's stdin held open does not hang its teardown",
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 0 {
				return fakeBehaviour{hang: true, holdStdin: stdinHeld}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			defer close(stdinHeld)
			srv := serve(t, h)
			big := strings.Repeat("x", 200<<10) // 3 times the pipe
			bodies := make(chan string, 2)
			for range 2 {
				go func() {
					req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
					req.Header.Set("X-Big", big)
					res, err := http.DefaultClient.Do(req)
					if err != nil {
						bodies <- err.Error()
						return
					}
					defer res.Body.Close()
					b, _ := io.ReadAll(res.Body)
					bodies <- fmt.Sprintf("%d %s", res.StatusCode, b)
				}()
			}
			c := firstChild(h)
			waitFor(t, 20*time.Second, "a write to the child blocked, with more frames behind it", func() bool {
				c.conn.mu.Lock()
				defer c.conn.mu.Unlock()
				return c.conn.writing && len(c.conn.pending) > 0
			})
			c.proc.Kill()
			for range 2 {
				assert.Equal(t, "200 slot=0 inc=1", <-bodies)
			}
			// OnEvent runs on its own goroutine: the answers may come first.
			waitFor(t, 10*time.Second, "four events", func() bool { return len(events.kinds()) >= 4 })
			assert.Equal(t, []string{"ChildStarted ", "ChildExited crash", "ModuleDegraded crash", "ChildStarted crash"}, events.kinds())
		},
	}, {
		// Both the protocol's stdout and stderr stay open after the
		// child's death: the teardown's waits for them share one
		// drainTimeout, and end.
		name: "a dead child's stdout and stderr held open do not hang its teardown",
		behave: func(slot, inc int) fakeBehaviour {
			if inc == 0 {
				return fakeBehaviour{dieAfter: 10 * time.Millisecond, holdStdout: bothHeld, holdStderr: bothHeld}
			}
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			defer close(bothHeld)
			waitFor(t, 20*time.Second, "the second child's ChildStarted", func() bool {
				return events.count(ChildStarted, "") >= 2
			})
			exited := events.first(ChildExited)
			took := exited.Time.Sub(f.startsOf()[0].at)
			assert.GreaterOrEqual(t, took, drainTimeout, "the teardown waited for the pipes")
			assert.Less(t, took, 2*drainTimeout+time.Second, "the teardown waited drainTimeout for each pipe")
		},
	}, {
		name: "MaxRequests replaces a child without backoff",
		opts: Options{MaxRequests: 5},
		behave: func(slot, inc int) fakeBehaviour {
			return fakeBehaviour{}
		},
		check: func(t *testing.T, h *Handle, f *fakeChildren, events *eventLog) {
			srv := serve(t, h)
			// A child due for recycling serves on until its replacement
			// is ready, so it may answer a few more than MaxRequests.
			seen := map[string]bool{}
			for deadline := time.Now().Add(20 * time.Second); len(seen) < 6; {
				require.True(t, time.Now().Before(deadline), "children seen: %v", seen)
				code, body := fetch(t, srv.URL)
				require.Equal(t, http.StatusOK, code, body)
				seen[body] = true
			}
			assert.GreaterOrEqual(t, len(seen), 6, "children seen: %v", seen)
			// Each child but the last was recycled; the events may lag.
			waitFor(t, 10*time.Second, "the recycling events", func() bool {
				return events.count(ChildRecycling, "max-requests") >= len(seen)-1
			})
			assert.Zero(t, events.count(ModuleBackoff, ""))
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			var events eventLog
			f := &fakeChildren{behave: tc.behave}
			opts := tc.opts
			opts.OnEvent = events.add
			h, err := startFake(t, f, opts)
			require.NoError(t, err)
			tc.check(t, h, f, &events)
		})
	}
}

// A fake child whose init fails makes Start fail with its error, and
// leaves nothing running.
func TestSuperviseFakeStartFails(t *testing.T) {
	f := &fakeChildren{behave: func(slot, inc int) fakeBehaviour {
		if slot == 1 {
			return fakeBehaviour{initErr: "slot 1 cannot start"}
		}
		return fakeBehaviour{}
	}}
	_, err := startFake(t, f, Options{Children: 2})
	var se *StartError
	require.True(t, errors.As(err, &se), "Start: %v", err)
	assert.Contains(t, err.Error(), "slot 1 cannot start")
	f.live.Wait() // the first child, which had started, is gone too
}

func pidsOf(cs []ChildStats) []int {
	var pids []int
	for _, c := range cs {
		pids = append(pids, c.Pid)
	}
	return pids
}

// A health check that fails because the child's pipe has ended (it is
// dying, and its exit is not yet seen) says nothing of its health: it is
// not counted, and no ChildUnhealthy is posted. (Such a dead child showed
// "unhealthy" in Stats, and at HealthFailures the parent logged it as
// unhealthy and killed it.)
func TestFailedCheckOfEndedChild(t *testing.T) {
	var events eventLog
	c := testChild(nil)
	h := c.h
	h.events = newEventQueue(events.add, h.logf)
	c.mu.Lock()
	c.err = errChildExited
	c.mu.Unlock()
	for range h.opts.HealthFailures + 1 {
		assert.True(t, h.failedCheck(c, errChildExited), "an ended child is not condemned by its checks")
	}
	assert.Zero(t, c.failedChecks)
	h.events.close()
	<-h.events.done
	assert.Empty(t, events.all())
}
