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
	resident, _ := p.statm()
	return resident
}

// AnonMemory returns the process's resident memory that is neither a
// file's nor shared, in bytes, from /proc; 0 if it cannot be read.
func (p *execProcess) AnonMemory() int64 {
	resident, shared := p.statm()
	return max(0, resident-shared)
}

// statm returns the process's resident memory, and the part of it that
// maps files or shared memory, in bytes, from /proc/<pid>/statm; zeros if
// it cannot be read.
func (p *execProcess) statm() (resident, shared int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", p.Pid()))
	if err != nil {
		return 0, 0
	}
	f := bytes.Fields(b)
	if len(f) < 3 {
		return 0, 0
	}
	r, err1 := strconv.ParseInt(string(f[1]), 10, 64)
	sh, err2 := strconv.ParseInt(string(f[2]), 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0
	}
	page := int64(os.Getpagesize())
	return r * page, sh * page
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
