package subproc

import (
	"os"
	"syscall"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, and has the kernel kill it if the thread
// that started it (see spawnLoop) dies.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
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
