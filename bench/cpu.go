package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"
)

// CPU time per unit of work. Throughput on a shared 2-core machine moves
// with whatever else runs; the CPU time a request costs each process
// moves much less, so the driver reads it before and after every timed
// load (never across a warmup).

// clockTick is the unit of utime and stime in /proc/<pid>/stat: USER_HZ,
// 100 on every Linux architecture Go supports (sysconf(_SC_CLK_TCK)
// without cgo). The figures are therefore exact to 10 ms of CPU per
// process and load, which the timed loads (seconds of CPU each) dwarf.
const clockTick = 10 * time.Millisecond

// CPUUse is the CPU time (user + system) that each process spent during
// one timed load.
type CPUUse struct {
	// LoadgenSec is the driver's own, from getrusage(RUSAGE_SELF): the
	// load generator's connections, and also the memory sampler during
	// the /small loads (a few /proc reads every 50 ms, well under 1% of
	// the load generator's figure).
	LoadgenSec float64 `json:"loadgen_s"`
	// ParentSec is the server process's own, from /proc/<pid>/stat
	// (utime + stime, all its threads).
	ParentSec float64 `json:"parent_s"`
	// ChildSec is the sum of the same over the server's descendants (the
	// peer's child; for subproc also its watcher process), found when the
	// load started.
	ChildSec float64 `json:"child_s"`
	// Children is how many descendants ChildSec sums: 0 for inproc.
	Children int `json:"children"`
	// StealPct is the share of the machine's CPU time (all its CPUs,
	// from /proc/stat) that the hypervisor gave to other guests while
	// this machine wanted it: what disturbed the load from outside. It
	// is -1 where /proc/stat cannot be read. (The share that other
	// processes used cannot be told from /proc/stat, whose busy ticks are
	// sampled: they missed a sixth of what the measured processes used,
	// as exactly counted, at one client.)
	StealPct float64 `json:"steal_pct"`
}

// cpuMeter reads the CPU time used so far by the load generator (this
// process), a server process, and the server's descendants. The
// descendants are found once, by newCPUMeter, outside the timed window
// (scanning /proc is the expensive part): a load that starts or ends
// processes cannot be measured, and read says so.
type cpuMeter struct {
	server   int   // fixed
	children []int // fixed: the server's descendants at newCPUMeter
}

// newCPUMeter returns a meter of the server process pid and of its
// current descendants.
func newCPUMeter(pid int) *cpuMeter {
	return &cpuMeter{server: pid, children: processTree(pid)[1:]}
}

// cpuReading is the CPU time used so far, as cpuMeter.read returns it.
type cpuReading struct {
	loadgen, parent, child time.Duration
	machine                machineTime
	err                    error // a process could not be read
}

// machineTime is the first line of /proc/stat: the CPU time of all the
// machine's CPUs so far, in clock ticks.
type machineTime struct {
	total, steal int64
	ok           bool
}

// readMachine reads /proc/stat's first line; ok is false if it cannot.
func readMachine() machineTime {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return machineTime{}
	}
	return parseMachine(b)
}

// parseMachine parses the "cpu" line that /proc/stat starts with: user
// nice system idle iowait irq softirq steal (guest time is in user).
func parseMachine(b []byte) machineTime {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := bytes.Fields(line)
	if len(f) < 9 || string(f[0]) != "cpu" {
		return machineTime{}
	}
	var v [8]int64
	for i := range v {
		n, err := strconv.ParseInt(string(f[i+1]), 10, 64)
		if err != nil {
			return machineTime{}
		}
		v[i] = n
	}
	m := machineTime{steal: v[7], ok: true}
	for _, n := range v {
		m.total += n
	}
	return m
}

// read returns the CPU time used so far. A process that has ended (or
// whose pid now names another process, which a vanished parent pid
// betrays) makes the reading an error.
func (m *cpuMeter) read() cpuReading {
	r := cpuReading{machine: readMachine()}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		r.err = fmt.Errorf("getrusage: %w", err)
		return r
	}
	r.loadgen = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	var err error
	if r.parent, _, err = procCPU(m.server); err != nil {
		r.err = fmt.Errorf("server process: %w", err)
		return r
	}
	for _, pid := range m.children {
		d, ppid, err := procCPU(pid)
		if err != nil || (ppid != m.server && !m.isChild(ppid)) {
			r.err = fmt.Errorf("child process %d ended during the load (%v)", pid, err)
			return r
		}
		r.child += d
	}
	return r
}

func (m *cpuMeter) isChild(pid int) bool {
	for _, c := range m.children {
		if c == pid {
			return true
		}
	}
	return false
}

// between returns the CPU time that m's processes used from reading a
// to reading b, or nil and why it cannot be known.
func (m *cpuMeter) between(a, b cpuReading) (*CPUUse, string) {
	for _, r := range []cpuReading{a, b} {
		if r.err != nil {
			return nil, r.err.Error()
		}
	}
	u := &CPUUse{
		LoadgenSec: (b.loadgen - a.loadgen).Seconds(),
		ParentSec:  (b.parent - a.parent).Seconds(),
		ChildSec:   (b.child - a.child).Seconds(),
		Children:   len(m.children),
		StealPct:   -1,
	}
	if total := b.machine.total - a.machine.total; a.machine.ok && b.machine.ok && total > 0 {
		u.StealPct = 100 * float64(b.machine.steal-a.machine.steal) / float64(total)
	}
	return u, ""
}

// procCPU returns the CPU time (utime + stime) that process pid has
// used, from /proc/<pid>/stat, and its parent's pid.
func procCPU(pid int) (cpu time.Duration, ppid int, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU parses a /proc/<pid>/stat line: pid (comm) state ppid ...,
// where comm may hold spaces and parentheses, utime and stime are fields
// 14 and 15 (counted from 1, pid being 1), in clock ticks.
func parseStatCPU(b []byte) (cpu time.Duration, ppid int, err error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("malformed /proc stat %q", b)
	}
	f := bytes.Fields(b[i+1:]) // f[0] is field 3, state
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("malformed /proc stat %q", b)
	}
	ppid, err1 := strconv.Atoi(string(f[1]))
	utime, err2 := strconv.ParseInt(string(f[11]), 10, 64)
	stime, err3 := strconv.ParseInt(string(f[12]), 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, fmt.Errorf("malformed /proc stat %q", b)
	}
	return time.Duration(utime+stime) * clockTick, ppid, nil
}
