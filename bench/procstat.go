package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// RSSResult is the memory the server process and its children held
// during the /small loads.
type RSSResult struct {
	// PeakMiB is the largest sum of VmRSS over the server process and its
	// descendants, sampled every 50 ms.
	PeakMiB float64 `json:"peak_rss_mib"`
	// HWMMiB is the sum of VmHWM (each process's own peak) of the server
	// process and its descendants at the end of the loads: an upper bound,
	// as the peaks need not coincide.
	HWMMiB float64 `json:"hwm_sum_mib"`
	// PSSPeakMiB is the largest sum of the proportional set sizes (Pss in
	// /proc/<pid>/smaps_rollup), sampled with VmRSS. Unlike RSS, it counts
	// a page that parent and child share (the binary's, mostly: the child
	// is the same executable) once in all, not once per process.
	PSSPeakMiB float64 `json:"peak_pss_mib"`
	// Processes is how many processes the sums cover.
	Processes int `json:"processes"`
	Samples   int `json:"samples"`
}

// rssSampler samples the resident memory of a process tree.
type rssSampler struct {
	root int
	stop chan struct{}
	done chan struct{}

	mu        sync.Mutex
	peakKB    int64
	peakPSSKB int64
	samples   int
}

// startRSSSampler starts sampling the tree rooted at pid.
func startRSSSampler(pid int) *rssSampler {
	s := &rssSampler{root: pid, stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s
}

func (s *rssSampler) run() {
	defer close(s.done)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var pids []int
	var refreshed time.Time
	for {
		// Rescanning /proc for the tree costs more than reading a few
		// status files, so it is done once a second.
		if time.Since(refreshed) > time.Second {
			pids, refreshed = processTree(s.root), time.Now()
		}
		var sum, pss int64
		for _, pid := range pids {
			kb, _ := statusKB(pid, "VmRSS:")
			sum += kb
			kb, _ = statusKBFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"), "Pss:")
			pss += kb
		}
		s.mu.Lock()
		s.peakKB = max(s.peakKB, sum)
		s.peakPSSKB = max(s.peakPSSKB, pss)
		s.samples++
		s.mu.Unlock()
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
	}
}

// finish stops sampling and returns the figures.
func (s *rssSampler) finish() RSSResult {
	close(s.stop)
	<-s.done
	pids := processTree(s.root)
	var hwm int64
	for _, pid := range pids {
		kb, _ := statusKB(pid, "VmHWM:")
		hwm += kb
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return RSSResult{
		PeakMiB:    float64(s.peakKB) / 1024,
		HWMMiB:     float64(hwm) / 1024,
		PSSPeakMiB: float64(s.peakPSSKB) / 1024,
		Processes:  len(pids),
		Samples:    s.samples,
	}
}

// processTree returns root and its descendants, from the parent pids in
// /proc/<pid>/stat.
func processTree(root int) []int {
	children := map[int][]int{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		b, err := os.ReadFile(d + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := bytes.Fields(b[i+1:])
		if len(f) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(string(f[1]))
		if err != nil {
			continue
		}
		children[ppid] = append(children[ppid], pid)
	}
	tree := []int{root}
	for i := 0; i < len(tree); i++ {
		tree = append(tree, children[tree[i]]...)
	}
	return tree
}

// statusKB returns a "kB" field of /proc/<pid>/status, such as "VmRSS:".
func statusKB(pid int, field string) (int64, bool) {
	return statusKBFile("/proc/"+strconv.Itoa(pid)+"/status", field)
}

// statusKBFile returns a "kB" field of a /proc file such as /proc/meminfo.
func statusKBFile(path, field string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	for line := range bytes.Lines(b) {
		if rest, ok := bytes.CutPrefix(line, []byte(field)); ok {
			f := bytes.Fields(rest)
			if len(f) == 0 {
				return 0, false
			}
			kb, err := strconv.ParseInt(string(f[0]), 10, 64)
			return kb, err == nil
		}
	}
	return 0, false
}
