//go:build unix && !linux

package subproc

import (
	"os"
	"syscall"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// awaitExit reports false: only Linux can wait for an exit without
// reaping (see execProcess.Wait).
func awaitExit(pid int) bool { return false }

// dup2 duplicates oldfd onto newfd.
func dup2(oldfd, newfd int) error {
	return syscall.Dup2(oldfd, newfd)
}

// dropFileMappings does nothing: only Linux needs it (see its Linux
// version) and has a way to find the mappings.
func dropFileMappings(everyFile bool) {}

// growPipe does nothing: only Linux can resize a pipe.
func growPipe(*os.File) {}

// allocateRing reports false: the rings need a file sealed against
// shrinking, which only Linux makes (see memoryFile).
func allocateRing(*os.File) bool { return false }

// memoryFile returns nil: only Linux has anonymous memory files that can
// be sealed.
func memoryFile() *os.File { return nil }

// sealSize reports false (see memoryFile).
func sealSize(*os.File) bool { return false }

// inheritedFDs reports none: only Linux lists a process's descriptors (see
// its Linux version).
func inheritedFDs() string { return "" }

// closeInheritedFDs does nothing; see inheritedFDs.
func closeInheritedFDs(string) {}
