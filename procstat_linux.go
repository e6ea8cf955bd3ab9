package subproc

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// Memory returns the process's resident memory in bytes, from /proc; 0 if
// it cannot be read.
func (p *execProcess) Memory() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", p.Pid()))
	if err != nil {
		return 0
	}
	f := bytes.Fields(b)
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseInt(string(f[1]), 10, 64)
	if err != nil {
		return 0
	}
	return pages * int64(os.Getpagesize())
}

// Quit sends the process SIGQUIT, which makes a Go program write every
// goroutine's stack to its stderr and exit. It reports whether it did: not
// for a process that has been reaped, nor for a stopped one, which could
// not act on it.
func (p *execProcess) Quit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped || stopped(p.Pid()) {
		return false
	}
	return syscall.Kill(p.Pid(), syscall.SIGQUIT) == nil
}

// stopped reports whether the process is stopped (by SIGSTOP, or traced).
func stopped(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses and may
	// hold anything.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	s := b[i+2]
	return s == 'T' || s == 't'
}
