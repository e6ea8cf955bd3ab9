//go:build unix && !linux

package subproc

import "sync/atomic"

// armExitWord does nothing: only Linux has robust futexes (see the Linux
// version). The parent then learns of a death from the pipe alone.
func armExitWord(word *atomic.Uint32) {}

// waitExitWord reports false at once (see armExitWord).
func waitExitWord(word *atomic.Uint32, stopped *atomic.Bool) bool { return false }

// stopExitWord does nothing (see armExitWord).
func stopExitWord(word *atomic.Uint32, stopped *atomic.Bool) {}
