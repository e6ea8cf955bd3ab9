package subproc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// This file holds the watcher: one process per parent, shared by every
// Handle, that kills the process groups of the parent's children when the
// parent dies, however it dies. The parent's side is watcherConn, the
// watcher's own is runWatcher.
//
// Why a watcher. On Linux the kernel kills a child whose parent dies (its
// parent-death signal, see sysProcAttr); that signal must be SIGKILL, so
// that a stopped child, or one whose Go runtime is starved, dies too, and
// SIGKILL leaves the child no chance to kill the processes its module
// started, whatever its state. (Elsewhere a running child sees its stdin
// end and kills its process group, see runChild, but a stopped or starved
// one runs no code.) The watcher runs no module code, so nothing stops or
// starves it, and it kills them.
//
// The watcher learns of the parent's death from the end of its stdin: the
// parent holds the only write end of that pipe (close-on-exec, so no
// other process inherits it), and the kernel closes it when the parent
// process dies, by SIGKILL as by exit. It does not use a parent-death
// signal, which on Linux comes when the thread that started the process
// ends, not the process.
//
// The protocol, a line at a time on the watcher's stdin:
//
//	subproc watcher <parent's pid>   the hello, always first
//	+<pgid>                          a child's process group to kill
//	-<pgid>                          a group no longer to kill
//
// When its stdin ends the watcher reads what is still in the pipe (the
// lines of a parent that died after writing them), kills every group still
// registered with SIGKILL, and exits. Once the hello is read it writes
// watcherReady to its stdout, which the parent awaits (see startLocked), so
// that a binary whose main does not run Main first is caught (within
// watcherStartTimeout) rather than left running as a second copy of the
// program.
//
// What is guaranteed, and the races (spawn, the watcher's death, the
// parent's death):
//
//   - A child's group is registered (its "+pgid" is in the pipe, or in the
//     hello batch of a new watcher) before spawn returns, so before the
//     child gets its hello and runs any module code; a child whose
//     registration fails is killed and spawn fails. A parent that dies
//     between the child's start and its registration leaves a child that
//     has started nothing, and that the kernel kills (Linux) or that sees
//     its stdin end.
//   - A group is unregistered after it has been killed and before its
//     leader, the child, is reaped (see execProcess.Wait), and a group's
//     id cannot be reused before that reaping, so while the parent lives
//     the watcher never holds an id that could name another group. (When
//     the parent dies between the kill and the "-pgid", the zombie child
//     passes to init, and its id could be reused only if init reaped it
//     and the system then handed out the same id, which it allocates
//     cyclically, all before the watcher, which has already seen its stdin
//     end, reads its last lines.)
//   - A new watcher is given every live group before it runs: its hello
//     and the registrations go into the pipe before it starts (up to
//     pipeAtomic bytes of them; beyond that, right after it is ready).
//   - A watcher that dies (someone killed it) is noticed at the parent's
//     next write to it, which fails: at the next child's start or end. A
//     failed "+pgid" starts a new watcher at once, given every live group,
//     that child's included; a failed "-pgid" only forgets the dead one,
//     and the next child's start starts a new one. Until then, and if the
//     watcher dies in the moment a registration is written (the write
//     succeeds but the line is lost with it), the processes that children
//     started would outlive a parent killed by SIGKILL (elsewhere than on
//     Linux, those of a running child die with it, see above).
//   - A watcher that stops reading (someone stopped it) and lets the pipe
//     fill is treated as dead after watcherWriteTimeout. The parent kills a
//     watcher with SIGKILL and reaps it before it closes its stdin, so that
//     a watcher it gives up on never sees its stdin end and kills groups
//     that are still alive.
//   - A parent that dies while it replaces its watcher (between the old
//     one's death and the new one's start) has no watcher: see above.
//
// Cost: one process per parent process, started at the first spawn and
// left running until the parent ends (it then exits by itself), with
// GOMAXPROCS=1, its working directory at /, and none of the parent's files
// open but its stdin (on Linux; elsewhere those without close-on-exec
// too, as in any process the parent starts: see strayFDs). Once ready it
// drops the pages of the binary that the program's initialization touched
// (see dropFileMappings): for the benchmark's binary about 4 MiB stays
// resident, half of it its heap and runtime, against 14 MiB without. The
// parent holds two file descriptors for it: the pipe's write end and the
// watcher's pidfd (os.Process).

// Environment variable that makes Main run as the watcher (see
// runWatcher); its value is the parent's pid.
const envWatcher = "SUBPROC_WATCHER"

// watcherReady is what a watcher writes to its stdout once it has read its
// hello.
const watcherReady = "subproc watcher ready\n"

const (
	// watcherStartTimeout bounds how long the parent waits for a new
	// watcher to be ready. A watcher is ready within milliseconds; one that
	// is not in this time is a binary whose main does not call Main first.
	watcherStartTimeout = 10 * time.Second
	// watcherWriteTimeout bounds a write to a watcher whose pipe is full.
	// A pipe holds thousands of lines: a watcher that does not take one in
	// this time has stopped reading.
	watcherWriteTimeout = 5 * time.Second
	// pipeAtomic is the most that can be written to an empty pipe without
	// blocking, on any system: a pipe holds at least one page.
	pipeAtomic = 4096
)

// watcherHello is the first line a watcher reads: it names the parent, as
// the watcher's envWatcher does.
func watcherHello(ppid int) string { return fmt.Sprintf("subproc watcher %d\n", ppid) }

// theWatcher is this process's watcher, shared by every Handle.
var theWatcher watcherConn

// watcherConn is the parent's side of its watcher. Its zero value has no
// watcher; register starts one. Its methods are safe for concurrent use.
type watcherConn struct {
	mu     sync.Mutex       // guards the fields below
	groups map[int]struct{} // the groups registered and not unregistered
	cmd    *exec.Cmd        // the running watcher, or nil
	w      *os.File         // the write end of cmd's stdin; nil with cmd
}

// register tells the watcher that the child that leads process group pgid
// has started, starting a watcher first if none runs or the running one is
// found dead, and given every live group. If it returns an error, no
// watcher holds pgid: the caller must kill the group and reap the child.
func (wc *watcherConn) register(pgid int) error {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if wc.groups == nil {
		wc.groups = make(map[int]struct{})
	}
	wc.groups[pgid] = struct{}{}
	if wc.cmd != nil && wc.writeLocked(fmt.Appendf(nil, "+%d\n", pgid)) == nil {
		return nil
	}
	if err := wc.startLocked(); err != nil {
		delete(wc.groups, pgid)
		return err
	}
	return nil
}

// unregister tells the watcher to forget process group pgid. The caller
// must have killed the group and not yet reaped its leader.
func (wc *watcherConn) unregister(pgid int) {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	delete(wc.groups, pgid)
	if wc.cmd != nil {
		// A failure forgets the watcher; the next register starts another.
		wc.writeLocked(fmt.Appendf(nil, "-%d\n", pgid))
	}
}

// pid returns the running watcher's pid, or 0 if none runs (as far as the
// parent knows).
func (wc *watcherConn) pid() int {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if wc.cmd == nil {
		return 0
	}
	return wc.cmd.Process.Pid
}

// writeLocked writes b to the watcher. If that fails (the watcher is dead,
// or has stopped reading), it forgets the watcher (see dropLocked) and
// returns the error.
func (wc *watcherConn) writeLocked(b []byte) error {
	err := wc.w.SetWriteDeadline(time.Now().Add(watcherWriteTimeout))
	if err == nil {
		_, err = wc.w.Write(b)
	}
	if err != nil {
		wc.dropLocked()
	}
	return err
}

// dropLocked kills the watcher, reaps it and closes its stdin, in that
// order: a watcher that was only slow must not see its stdin end, which
// would make it kill groups that are alive.
func (wc *watcherConn) dropLocked() {
	wc.cmd.Process.Kill()
	wc.cmd.Wait()
	wc.w.Close()
	wc.cmd, wc.w = nil, nil
}

// startLocked starts a watcher and gives it every registered group. The
// watcher is a re-execution of the binary, which Main turns into
// runWatcher; it runs in a process group of its own, so that a terminal's
// Ctrl-C to the parent's group does not reach it.
func (wc *watcherConn) startLocked() error {
	exe, err := executable()
	if err != nil {
		return fmt.Errorf("finding the executable to re-run as the watcher: %w", err)
	}
	msg := []byte(watcherHello(os.Getpid()))
	for pgid := range wc.groups {
		msg = fmt.Appendf(msg, "+%d\n", pgid)
	}
	// The hello, and the registrations that fit, go into the pipe before
	// the watcher starts: should the parent die at once, the watcher still
	// finds them.
	head := len(msg)
	if head > pipeAtomic {
		head = bytes.LastIndexByte(msg[:pipeAtomic], '\n') + 1
	}
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating the watcher's pipe: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		r.Close()
		w.Close()
		return fmt.Errorf("creating the watcher's pipe: %w", err)
	}
	defer readyR.Close()
	cmd := exec.Command(exe)
	cmd.Args = []string{os.Args[0]}
	// The parent's environment, for the package init functions that run
	// before Main; GOMAXPROCS=1, as the watcher needs one thread.
	cmd.Env = append(os.Environ(), envWatcher+"="+strconv.Itoa(os.Getpid()), "GOMAXPROCS=1")
	cmd.Env = withStrayFDs(cmd.Env)
	cmd.Dir = "/" // so that it keeps no directory of the parent's busy
	cmd.Stdin = r
	cmd.Stdout, cmd.Stderr = readyW, readyW // what it says before it is ready goes in the error
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	_, err = w.Write(msg[:head]) // into an empty pipe: it cannot block
	if err == nil {
		err = cmd.Start()
	}
	// The parent keeps no read end: a write to a dead watcher fails.
	r.Close()
	readyW.Close()
	if err != nil {
		w.Close()
		return fmt.Errorf("starting the watcher: %w", err)
	}
	wc.cmd, wc.w = cmd, w
	if err := awaitWatcher(readyR); err != nil {
		wc.dropLocked()
		return fmt.Errorf("starting the watcher (%s re-executed with %s set, which kills the processes modules start if this process dies): %w; "+
			"make subproc.Main() the first statement of main (and of TestMain), so that the re-executed binary becomes the watcher", exe, envWatcher, err)
	}
	if head < len(msg) {
		if err := wc.writeLocked(msg[head:]); err != nil {
			return fmt.Errorf("writing to the watcher: %w", err)
		}
	}
	return nil
}

// awaitWatcher waits until a new watcher has written watcherReady to r, the
// read end of its stdout and stderr, for at most watcherStartTimeout. Its
// error holds what the watcher wrote instead, if anything.
func awaitWatcher(r *os.File) error {
	r.SetReadDeadline(time.Now().Add(watcherStartTimeout))
	var out []byte
	buf := make([]byte, 512)
	for {
		n, err := r.Read(buf)
		if len(out) < 4096 {
			out = append(out, buf[:n]...)
		}
		if bytes.Contains(out, []byte(watcherReady)) {
			return nil
		}
		if err != nil {
			if err == io.EOF {
				err = errors.New("it exited before it was ready")
			} else if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("it was not ready within %v", watcherStartTimeout)
			}
			if len(out) > 0 {
				err = fmt.Errorf("%w; its output: %q", err, out)
			}
			return err
		}
	}
}

// runWatcher is Main in the watcher (see watcherConn); ppid is the value of
// envWatcher. It returns the exit status after its stdin ends and it has
// killed the groups still registered; or, at once and killing nothing, a
// misuse status if the process was not started as a watcher: its stdin is
// not a pipe whose first line is the hello of the parent that ppid names.
func runWatcher(ppid string) int {
	misused := func(why string) int {
		fmt.Fprintf(os.Stderr, "subproc: this process was started with %s=%q set, but not by subproc.Start (%s), so it has no parent to watch.\n"+
			"Unset %s to run the program normally.\n", envWatcher, ppid, why, envWatcher)
		return exitMisused
	}
	// The end of stdin is what counts; a hangup of the terminal is not.
	signal.Ignore(syscall.SIGHUP)
	pid, err := strconv.Atoi(ppid)
	if err != nil || pid <= 0 {
		return misused("its value is not a process id")
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(0, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		return misused("its stdin is not a pipe")
	}
	in := bufio.NewReader(os.Stdin)
	if hello, _ := in.ReadString('\n'); hello != watcherHello(pid) {
		return misused(fmt.Sprintf("its stdin does not begin with %q", watcherHello(pid)))
	}
	closeStrayFDs()
	os.Stdout.WriteString(watcherReady)
	// The parent stops reading them: nothing must be written there any more.
	if null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
		dup2(int(null.Fd()), 1)
		dup2(int(null.Fd()), 2)
		null.Close()
	}
	// What the program's initialization touched, the watcher no longer
	// needs: the heap it left, and the pages of the binary (which stay in
	// the page cache, shared with the parent and the children).
	debug.FreeOSMemory()
	dropFileMappings(true)

	self := syscall.Getpgrp()
	groups := make(map[int]bool)
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			break // the parent is gone; a partial line is not a registration
		}
		if len(line) < 3 {
			continue
		}
		pgid, err := strconv.Atoi(line[1 : len(line)-1])
		// Never 1 or less: kill(-1) would signal every process there is.
		if err != nil || pgid <= 1 || pgid == self {
			continue
		}
		switch line[0] {
		case '+':
			groups[pgid] = true
		case '-':
			delete(groups, pgid)
		}
	}
	for pgid := range groups {
		syscall.Kill(-pgid, syscall.SIGKILL)
	}
	return exitOK
}
