package subproc

import (
	"os"
	"syscall"
	"unsafe"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, and has the kernel kill it if the thread
// that started it (see spawnLoop) dies. The signal is SIGKILL, which needs
// nothing of the child: it ends a stopped child, and one whose Go runtime is
// wedged and would never run a signal handler. The processes the module
// started are the watcher's job (see watcherConn).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
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
