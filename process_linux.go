package subproc

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"unsafe"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, and has the kernel kill it if the thread
// that started it (see spawnLoop) dies. The signal is SIGKILL, which needs
// nothing of the child: it ends a stopped child, and one whose Go runtime is
// wedged and would never run a signal handler. The processes the module
// started are its watcher's job (see startWatcher).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// Environment variable that makes Main run as the watcher of a child (see
// startWatcher); its value is "<parent's pid> <child's pid>".
const envWatcher = "SUBPROC_WATCHER"

// watcherDeathSignal is the watcher's parent-death signal. SIGCONT, whose
// default action is only to continue, cannot kill the watcher before it has
// set up its handler, and wakes a watcher that was stopped; the watcher
// does not trust the signal but checks its parent (see runWatcher).
const watcherDeathSignal = syscall.SIGCONT

// startWatcher starts the watcher of the child with the given pid, which
// leads its own process group. It must be called from spawnLoop's thread.
//
// The watcher is a re-execution of the binary (see Main) that joins the
// child's process group and waits, doing nothing, for the parent to die;
// then it kills the group, itself included, so that the processes the
// module started die with the child even when the parent is killed by
// SIGKILL. The child cannot do that itself in every case: the kernel's
// parent-death signal to it must be SIGKILL (see sysProcAttr), and a
// stopped child, or one whose Go runtime is starved, runs no handler. The
// watcher runs no module code, so nothing stops or starves it (a watcher
// that is stopped is woken by its parent-death signal). While the parent
// lives, the parent kills the group itself (see execProcess), the watcher
// with it.
func startWatcher(pid int) (*exec.Cmd, error) {
	exe, err := executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %d", envWatcher, os.Getpid(), pid), "GOMAXPROCS=1")
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pid, Pdeathsig: watcherDeathSignal}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd, nil
}

// runWatcher is Main in a watcher (see startWatcher); ids is the value of
// envWatcher. It returns only if the process was not started as a watcher:
// one that is not in the process group of the child it names, lest it kill
// the group of whatever ran it.
func runWatcher(ids string) int {
	c := make(chan os.Signal, 1)
	signal.Notify(c, watcherDeathSignal, syscall.SIGHUP)
	var ppid, pgid int
	if _, err := fmt.Sscanf(ids, "%d %d", &ppid, &pgid); err != nil || syscall.Getpgrp() != pgid || pgid == os.Getpid() {
		fmt.Fprintf(os.Stderr, "subproc: this process was started with %s=%q set, but not by subproc.Start, so it has no child to watch.\n"+
			"Unset %s to run the program normally.\n", envWatcher, ids, envWatcher)
		return exitMisused
	}
	for {
		// A parent-death signal that came before Notify is lost, and one
		// can come for another reason: the parent is what counts. The
		// kernel changes it before it sends the signal.
		if os.Getppid() != ppid {
			syscall.Kill(0, syscall.SIGKILL)
		}
		<-c
	}
}

// awaitExit waits until the process pid, a child of this process, has
// exited, without reaping it, and reports whether it did so: the caller may
// then signal the process's group, as a zombie's pid is not reused.
func awaitExit(pid int) bool {
	const pPID = 1     // P_PID
	var info [128]byte // siginfo_t
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid), uintptr(unsafe.Pointer(&info[0])), syscall.WEXITED|syscall.WNOWAIT, 0, 0)
		if errno != syscall.EINTR {
			return errno == 0
		}
	}
}

// dup2 duplicates oldfd onto newfd.
func dup2(oldfd, newfd int) error {
	return syscall.Dup3(oldfd, newfd, 0)
}

// pipeSize is the capacity asked for the protocol's pipes. The default, 64
// KiB, holds two body chunks, so that a streaming sender blocks, and wakes
// its reader, every other chunk.
const pipeSize = 1 << 20

// growPipe raises the capacity of the pipe f belongs to, if the system
// allows; it is only an optimization.
func growPipe(f *os.File) {
	const fSetPipeSize = 1031 // F_SETPIPE_SZ
	sc, err := f.SyscallConn()
	if err != nil {
		return
	}
	sc.Control(func(fd uintptr) {
		syscall.Syscall(syscall.SYS_FCNTL, fd, fSetPipeSize, pipeSize)
	})
}
