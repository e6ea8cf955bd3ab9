//go:build unix && !linux

package subproc

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// Environment variable that makes Main run as the watcher of a child; only
// Linux has watchers (see process_linux.go).
const envWatcher = "SUBPROC_WATCHER"

// startWatcher starts no watcher: without a parent-death signal, a watcher
// could not learn of the parent's death before the child does. A running
// child whose parent dies sees its stdin close and kills its process group.
func startWatcher(pid int) (*exec.Cmd, error) { return nil, nil }

// runWatcher reports a misuse: no watcher is started here.
func runWatcher(ids string) int {
	fmt.Fprintf(os.Stderr, "subproc: this process was started with %s=%q set, but not by subproc.Start, so it has no child to watch.\n"+
		"Unset %s to run the program normally.\n", envWatcher, ids, envWatcher)
	return exitMisused
}

// awaitExit reports false: only Linux can wait for an exit without
// reaping (see execProcess.Wait).
func awaitExit(pid int) bool { return false }

// dup2 duplicates oldfd onto newfd.
func dup2(oldfd, newfd int) error {
	return syscall.Dup2(oldfd, newfd)
}

// growPipe does nothing: only Linux can resize a pipe.
func growPipe(*os.File) {}
