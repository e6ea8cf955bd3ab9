//go:build !linux

package subproc

import "syscall"

// Memory returns 0: there is no portable way to read another process's
// resident memory, so MemoryHigh and MemoryMax need Linux.
func (p *execProcess) Memory() int64 { return 0 }

// AnonMemory returns 0, as Memory does.
func (p *execProcess) AnonMemory() int64 { return 0 }

// Quit sends the process SIGQUIT, which makes a Go program write every
// goroutine's stack to its stderr and exit. It reports whether it did.
func (p *execProcess) Quit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped {
		return false
	}
	return p.cmd.Process.Signal(syscall.SIGQUIT) == nil
}
