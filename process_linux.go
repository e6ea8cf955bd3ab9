package subproc

import "syscall"

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
