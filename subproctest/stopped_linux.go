package subproctest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// awaitStopped waits until process pid is stopped (state T in
// /proc/<pid>/stat), for at most timeout.
func awaitStopped(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		state, err := procState(pid)
		switch {
		case err != nil:
			return fmt.Errorf("waiting for it to stop: %w", err)
		case state == 'T' || state == 't':
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("not stopped %v after SIGSTOP (state %c)", timeout, state)
		}
		time.Sleep(time.Millisecond)
	}
}

// procState returns the state letter of process pid from /proc.
func procState(pid int) (byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// "pid (comm) S ...": comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return 0, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
	}
	return s[i+2], nil
}
