package subproc

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// This file starts child processes. The child is a re-execution of the
// running binary with envModule set; Main, in the child, recognises it.

// Environment variable that tells Main it runs in a child, and which module
// to run. Main removes it from the child's environment before module code
// runs, so that processes the module starts do not inherit it.
const envModule = "SUBPROC_MODULE"

// Environment variable that tells a child or the watcher which of its file
// descriptors it inherited though nobody gave them to it; see
// inheritedFDs.
const envInherited = "SUBPROC_INHERITED"

// strayFDs is inheritedFDs as of this process's first start of a child or
// watcher. Listing is dear (about 1.5 µs per open descriptor, 15 ms for a
// server with 10,000 connections), and the descriptors it finds are, in
// practice, those a process inherits as it starts; a process that closes
// one and reuses its number leaves the list stale but harmless, as a child
// closes a listed descriptor only if it is still the file listed.
var strayFDs = sync.OnceValue(inheritedFDs)

// withStrayFDs returns env with envInherited naming the strayFDs, if there
// are any, for a child or the watcher to close (closeStrayFDs).
func withStrayFDs(env []string) []string {
	if fds := strayFDs(); fds != "" {
		return append(env, envInherited+"="+fds)
	}
	return env
}

// closeStrayFDs closes, in a child or the watcher, the descriptors that
// the parent listed in envInherited (see withStrayFDs), and unsets it, so
// that the processes the module starts do not see it.
func closeStrayFDs() {
	closeInheritedFDs(os.Getenv(envInherited))
	os.Unsetenv(envInherited)
}

// File descriptors of the child, besides stdin and stdout (the protocol) and
// stderr (captured as the module's stderr).
const (
	fdStdout = 3 // captured as the module's stdout; Main moves it to fd 1
	fdLog    = 4 // Env.Logger's records
	fdAccept = 5 // shared memory for the child's acceptWord
)

// A process is a started child process.
type process interface {
	Pid() int
	// Wait waits for the process to exit, kills what is left of its
	// process group (the processes the module started), and reaps it. It
	// is called once.
	Wait() error
	// Kill kills the process and its process group with SIGKILL, which also
	// ends a stopped process. It is safe to call at any time, any number of
	// times.
	Kill()
	// Quit asks the process for its goroutine stacks, with SIGQUIT, and
	// reports whether it could: not once it is reaped, nor while it is
	// stopped.
	Quit() bool
	// Memory returns the process's resident memory in bytes; 0 if unknown.
	Memory() int64
	// AnonMemory is Memory without the pages of files (its binary's) and
	// of shared memory: what the process allocated.
	AnonMemory() int64
}

// childPipes are the parent's ends of a new child's pipes.
type childPipes struct {
	toChild   *os.File // the child's stdin
	fromChild *os.File // the child's stdout
	stdout    *os.File // what the module writes to fd 1
	stderr    *os.File // what the module writes to fd 2
	log       *os.File // Env.Logger's records
	accept    *acceptWord
	rings     sharedRings // nil rings if the system has none (see allocateRing)
}

func (p *childPipes) closeReaders() {
	for _, f := range []*os.File{p.fromChild, p.stdout, p.stderr, p.log} {
		f.Close()
	}
}

// execProcess is a process started by os/exec, the leader of its own
// process group, which is registered with the watcher (see watcherConn).
type execProcess struct {
	cmd *exec.Cmd // fixed

	mu     sync.Mutex // guards reaped
	reaped bool       // reaped, or a zombie about to be whose group Wait kills: Kill and Quit do nothing
}

func (p *execProcess) Pid() int { return p.cmd.Process.Pid }

// Wait waits for the child to exit, then kills its process group, so that
// processes the module started die with the child however it ended: a
// stop, a crash or a kill; then it unregisters the group from the watcher.
// Where the system can wait for an exit without reaping (awaitExit), the
// group is signalled, and unregistered, while the child is a zombie, whose
// pid, and so the group's id, cannot be reused: the watcher never holds an
// id that may name another group. Elsewhere it is signalled, and
// unregistered, just after the reaping: the group id cannot be reused
// either while processes of the group remain, and when none remains there
// is nothing to kill, except, in the moment between the reaping and the
// signal, a new group that got the same id.
func (p *execProcess) Wait() error {
	pid := p.cmd.Process.Pid
	zombie := awaitExit(pid)
	if zombie {
		// From here Kill has nothing left to do, and must not signal
		// the group once the reaping below has freed its id.
		p.mu.Lock()
		p.reaped = true
		p.mu.Unlock()
		syscall.Kill(-pid, syscall.SIGKILL)
		theWatcher.unregister(pid)
	}
	err := p.cmd.Wait()
	p.mu.Lock()
	p.reaped = true
	p.mu.Unlock()
	if !zombie {
		syscall.Kill(-pid, syscall.SIGKILL)
		theWatcher.unregister(pid)
	}
	return err
}

func (p *execProcess) Kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped {
		return
	}
	// The child leads its own process group (Setpgid), so this also ends
	// processes the module started. The pid cannot have been reused: the
	// child is not reaped yet.
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	p.cmd.Process.Kill()
}

// memoryLimit returns the GOMEMLIMIT a child with the given limits gets:
// 90% of the lower one that is set, so that the Go runtime collects before
// the limit is reached; 0 if neither is.
func memoryLimit(high, max int64) int64 {
	limit := high
	if limit == 0 || (max > 0 && max < limit) {
		limit = max
	}
	return limit / 10 * 9
}

// executable returns the path that re-executes the running binary.
func executable() (string, error) {
	if _, err := os.Stat("/proc/self/exe"); err == nil {
		return "/proc/self/exe", nil
	}
	return os.Executable()
}

// spawnRequest asks spawnLoop to start a child.
type spawnRequest struct {
	cmd  *exec.Cmd
	errc chan error // cmd.Start's error
}

// spawnLoop starts the handle's children from one locked OS thread. On
// Linux each child is started with a parent-death signal, which the kernel
// sends when the thread that started it exits; starting them all from a
// thread that lives as long as the handle makes that signal mean "the
// parent process died", so that even a stopped or wedged child cannot
// outlive a parent killed by SIGKILL. (A running child also sees its stdin
// close, kills its process group and exits; the watcher kills the groups
// of the others, see watcherConn.) spawnLoop returns when spawns is closed,
// after the last child has been reaped.
//
// Only children are started here: the watcher, which must outlive any one
// handle, has no parent-death signal and is started by spawn's caller.
func (h *Handle) spawnLoop() {
	runtime.LockOSThread()
	// The thread is never unlocked: it ends with this goroutine.
	defer close(h.spawnDone)
	for req := range h.spawns {
		req.errc <- req.cmd.Start()
	}
}

// spawn starts a child process for the module, with its pipes.
//
// It is the Handle's launcher: slot and incarnation reach the child in its
// hello, not here.
func (h *Handle) spawn(slot, incarnation int) (process, *childPipes, error) {
	exe, err := executable()
	if err != nil {
		return nil, nil, fmt.Errorf("finding the executable to re-run: %w", err)
	}
	var parent, child []*os.File // parent's ends, child's ends
	defer func() {
		for _, f := range child {
			f.Close()
		}
	}()
	pipe := func(parentReads bool) error {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		if parentReads {
			parent, child = append(parent, r), append(child, w)
		} else {
			parent, child = append(parent, w), append(child, r)
		}
		return nil
	}
	for _, parentReads := range []bool{false, true, true, true, true} {
		if err := pipe(parentReads); err != nil {
			for _, f := range parent {
				f.Close()
			}
			return nil, nil, fmt.Errorf("creating pipes: %w", err)
		}
	}
	growPipe(parent[0]) // to the child
	growPipe(parent[1]) // from the child
	accept, rings, shm, err := newSharedWord()
	if err != nil {
		for _, f := range parent {
			f.Close()
		}
		return nil, nil, err
	}
	child = append(child, shm) // closed with the others: the mapping stays
	p := &childPipes{toChild: parent[0], fromChild: parent[1], stdout: parent[2], stderr: parent[3], log: parent[4], accept: accept, rings: rings}

	cmd := exec.Command(exe)
	cmd.Args = []string{os.Args[0]}
	env := h.opts.Env
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(env[:len(env):len(env)], envModule+"="+h.name)
	if limit := memoryLimit(h.opts.MemoryHigh, h.opts.MemoryMax); limit > 0 && !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "GOMEMLIMIT=") }) {
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+strconv.FormatInt(limit, 10))
	}
	cmd.Dir = h.opts.Dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = child[0], child[1], child[3]
	cmd.ExtraFiles = []*os.File{child[2], child[4], shm} // fdStdout, fdLog, fdAccept
	cmd.SysProcAttr = sysProcAttr()

	release := func() {
		p.toChild.Close()
		p.closeReaders()
		accept.close()
	}
	cmd.Env = withStrayFDs(cmd.Env)
	req := spawnRequest{cmd: cmd, errc: make(chan error, 1)}
	h.spawns <- req
	if err := <-req.errc; err != nil {
		release()
		return nil, nil, fmt.Errorf("starting %s: %w", exe, err)
	}
	// Registered before the child gets its hello, so before module code
	// runs: whatever the module starts, the watcher knows its group.
	if err := theWatcher.register(cmd.Process.Pid); err != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		release()
		return nil, nil, err
	}
	return &execProcess{cmd: cmd}, p, nil
}
