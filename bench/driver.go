package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Which workloads each peer runs, and why not the others.
var notApplicable = map[string]map[string]string{
	"inproc": {
		"restart": "no child to kill",
	},
	"goplugin": {
		"stream": "go-plugin's net/rpc is unary: the response would be buffered whole (and gob refuses messages of 1 GiB)",
		"ws":     "go-plugin's net/rpc is unary: the child's handler cannot hijack the connection, so nothing can upgrade",
	},
	"pipe": {
		"small":   "the pipe peer only streams",
		"echo":    "the pipe peer only streams",
		"ws":      "the pipe peer only streams raw bytes over HTTP",
		"restart": "the pipe peer only streams",
		"rss":     "measured during the /small loads, which the pipe peer does not serve",
	},
}

// applies reports whether peer runs workload.
func applies(peer, workload string) bool {
	_, na := notApplicable[peer][workload]
	return !na
}

// drive runs cfg.Rounds rounds of every peer in turn (inproc, uds, ...,
// then inproc, uds, ... again), each with a server process of its own,
// writes the results to cfg.Out and prints the markdown to stdout.
// Interleaving spreads a change in the machine's load over every peer
// instead of biasing the one that ran during it.
func drive(cfg Config, stdout io.Writer) error {
	if err := os.MkdirAll(filepath.Join(cfg.Out, "tmp"), 0o755); err != nil {
		return err
	}
	res := &Results{Machine: machineInfo(), Config: cfg}
	t0 := time.Now()
	for i := range cfg.Rounds {
		rd := Round{Round: i + 1}
		for _, name := range cfg.Peers {
			fmt.Fprintf(os.Stderr, "== round %d/%d: %s (%s)\n", i+1, cfg.Rounds, name, time.Since(t0).Round(time.Second))
			pr := runPeer(cfg, name, i+1)
			for _, e := range pr.Errors {
				fmt.Fprintf(os.Stderr, "   error: %s\n", e)
			}
			rd.Peers = append(rd.Peers, pr)
		}
		res.Rounds = append(res.Rounds, rd)
	}
	res.Finished = time.Now().UTC().Format(time.RFC3339)
	res.LoadAvgEnd = loadAvg()
	res.summarize()
	md := res.Markdown()
	if err := writeResults(cfg.Out, res, md); err != nil {
		return err
	}
	fmt.Fprint(stdout, md)
	fmt.Fprintf(os.Stderr, "wrote %s after %s\n", strings.Join([]string{
		filepath.Join(cfg.Out, "results.md"),
		filepath.Join(cfg.Out, "results.json"),
		filepath.Join(cfg.Out, "results.svg"),
	}, ", "), time.Since(t0).Round(time.Second))
	return nil
}

// runPeer starts the peer's server process and runs its workloads in
// order: /small with 1 then 64 clients (sampling memory), /echo, /stream,
// the WebSocket echo with 1 then 64 connections and the WebSocket stream,
// then the kills; then it stops the server. Every timed load has its own
// warmup, and its CPU time is read around the timed part. A workload that
// fails is recorded and the next runs.
func runPeer(cfg Config, name string, round int) PeerResult {
	pr := PeerResult{Name: name, NotApplicable: notApplicable[name]}
	srv, err := startServer(cfg, name, round)
	if err != nil {
		pr.Errors = append(pr.Errors, "starting server: "+err.Error())
		return pr
	}
	defer func() {
		if err := srv.stop(); err != nil {
			pr.Errors = append(pr.Errors, "stopping server: "+err.Error())
		}
	}()
	fail := func(workload string, err error) {
		pr.Errors = append(pr.Errors, workload+": "+err.Error())
	}
	step := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "   "+format+"\n", args...)
	}
	cpuNote := func(c *CPUUse, units float64, unit string) string {
		if c == nil {
			return "CPU not measured"
		}
		return fmt.Sprintf("CPU %s: parent %.0f, child %.0f, loadgen %.0f; steal %.1f %% of the machine", unit, c.ParentSec/units*1e6, c.ChildSec/units*1e6, c.LoadgenSec/units*1e6, c.StealPct)
	}
	load := func(what string, clients int, bodyBytes int, newConn func(time.Time) loadConn) *LoadResult {
		r, n, _ := retime(cfg, step, func() (LoadResult, *CPUUse, error) {
			r := runLoad(clients, cfg.Warmup, cfg.Duration, bodyBytes, newCPUMeter(srv.pid()), newConn)
			step("%s x%d: %.0f/s, p50 %.0f µs, p99 %.0f µs, %d errors; %s", what, clients, r.ReqPerSec, r.P50us, r.P99us, r.Errors,
				cpuNote(r.CPU, float64(max(r.Requests, 1)), "µs each"))
			return r, r.CPU, nil
		})
		r.Timings = n
		return &r
	}
	stream := func(what string, run func(n int64, meter *cpuMeter) (StreamResult, error)) *StreamResult {
		// A short stream first, so that the timed one finds warm paths.
		if _, err := run(16<<20, nil); err != nil {
			fail(what+" warmup", err)
			return nil
		}
		r, n, err := retime(cfg, step, func() (StreamResult, *CPUUse, error) {
			r, err := run(cfg.StreamBytes, newCPUMeter(srv.pid()))
			if err == nil {
				step("%s %d MiB: %.0f MB/s; %s", what, r.Bytes>>20, r.MBPerSec, cpuNote(r.CPU, float64(r.Bytes)/1e6, "ms/GB"))
			}
			return r, r.CPU, err
		})
		if err != nil {
			fail(what, err)
			return nil
		}
		r.Timings = n
		return &r
	}

	if applies(name, "small") && cfg.runs("small") {
		sampler := startRSSSampler(srv.pid())
		pr.Small1 = load("small", 1, 0, httpLoad(srv.addr, smallOp))
		pr.Small64 = load("small", 64, 0, httpLoad(srv.addr, smallOp))
		rss := sampler.finish()
		step("rss: peak %.1f MiB over %d processes (VmHWM sum %.1f MiB)", rss.PeakMiB, rss.Processes, rss.HWMMiB)
		pr.RSS = &rss
	}
	if applies(name, "echo") && cfg.runs("echo") {
		body := echoBody(cfg.EchoBytes)
		pr.Echo = load("echo", cfg.EchoClients, len(body), httpLoad(srv.addr, echoOp(body)))
	}
	if applies(name, "stream") && cfg.runs("stream") {
		pr.Stream = stream("stream", func(n int64, meter *cpuMeter) (StreamResult, error) {
			return runStream(srv.addr, n, cfg.StreamChunk, meter)
		})
	}
	if applies(name, "ws") && cfg.runs("ws") {
		msg := echoBody(cfg.WSEchoBytes)
		pr.WSEcho1 = load("ws echo", 1, 0, wsEchoLoad(srv.addr, msg))
		pr.WSEcho64 = load("ws echo", 64, 0, wsEchoLoad(srv.addr, msg))
		pr.WSStream = stream("ws stream", func(n int64, meter *cpuMeter) (StreamResult, error) {
			return runWSStream(srv.addr, n, cfg.StreamChunk, meter)
		})
	}
	if applies(name, "restart") && cfg.runs("restart") {
		r, err := runRestarts(srv.addr, cfg.Kills)
		if err != nil {
			fail("restart", err)
		}
		if len(r.SamplesMs) > 0 {
			step("restart: median %.1f ms of %d kills", r.MedianMs, len(r.SamplesMs))
			pr.Restart = &r
		}
	}
	return pr
}

// retime runs timed, a timed load or stream, and again while the
// hypervisor stole more than cfg.MaxSteal percent of the machine's CPU time
// during it, up to cfg.Retimes more times. It returns the least disturbed
// timing (the first whose steal is unknown or within the bound, else the
// one with the least steal) and how many timings it ran, or timed's first
// error. Stolen time slows whichever process the hypervisor preempted, so a
// disturbed timing is retaken rather than averaged in.
func retime[R any](cfg Config, step func(string, ...any), timed func() (R, *CPUUse, error)) (best R, n int, err error) {
	bestSteal := math.Inf(1)
	for {
		r, cpu, err := timed()
		n++
		if err != nil {
			return best, n, err
		}
		steal := -1.0 // unknown
		if cpu != nil {
			steal = cpu.StealPct
		}
		if steal < bestSteal {
			best, bestSteal = r, steal
		}
		if cfg.MaxSteal <= 0 || bestSteal <= cfg.MaxSteal || n > cfg.Retimes {
			return best, n, nil
		}
		step("  the hypervisor stole %.1f %% of the machine, more than -max-steal %g %%: timed again", steal, cfg.MaxSteal)
	}
}

// server is a running server process under test.
type server struct {
	cmd  *exec.Cmd
	addr string
	log  *os.File
}

func (s *server) pid() int { return s.cmd.Process.Pid }

// startServer starts the server process of a peer for a round and waits
// for the address it prints once ready. Its stderr goes to
// <out>/tmp/<peer>-<round>.log.
func startServer(cfg Config, name string, round int) (*server, error) {
	logf, err := os.Create(filepath.Join(cfg.Out, "tmp", fmt.Sprintf("%s-%d.log", name, round)))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), envRole+"=server", envPeer+"="+name)
	cmd.Stderr = logf
	// If the driver dies, so does the server (and, by their own
	// Pdeathsig, its children).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	s := &server{cmd: cmd, log: logf}
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(l)
		io.Copy(io.Discard, out)
	}()
	select {
	case s.addr = <-line:
	case <-time.After(time.Minute):
	}
	if s.addr == "" {
		s.stop()
		return nil, fmt.Errorf("server printed no address; see %s", logf.Name())
	}
	return s, nil
}

// stop asks the server to shut down (SIGTERM), and kills it if it has not
// exited within 20 s.
func (s *server) stop() error {
	defer s.log.Close()
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		s.cmd.Process.Kill()
		<-done
		return errors.New("did not exit within 20s of SIGTERM; killed")
	}
}

// RestartResult is what the kill workload measured: for each SIGKILL of
// the child, the time from the kill to the first 200 on GET /small.
type RestartResult struct {
	Kills     int       `json:"kills"`
	SamplesMs []float64 `json:"samples_ms"`
	MedianMs  float64   `json:"median_ms"`
	MinMs     float64   `json:"min_ms"`
	MaxMs     float64   `json:"max_ms"`
	// Non200 counts the answers other than 200 (502, 503) the polling
	// client got while the child was down; FailedPolls the polls that
	// failed outright (connection errors).
	Non200      int `json:"non_200"`
	FailedPolls int `json:"failed_polls"`
}

// runRestarts SIGKILLs the server's child kills times. Before each kill it
// waits until a child (a new one after a kill) serves /small, and lets it
// run for a while; then it kills the child and polls GET /small on a keep-alive connection, with a
// 1 ms sleep after an answer other than 200, until a 200.
func runRestarts(addr string, kills int) (RestartResult, error) {
	res := RestartResult{Kills: kills}
	ctl := newClient(addr)
	defer ctl.close()
	poll := newClient(addr)
	defer poll.close()
	childPid := func() (int, error) {
		ctl.setDeadline(time.Now().Add(10 * time.Second))
		var pid int
		status, _, err := ctl.do("GET /_pid HTTP/1.1\r\nHost: bench\r\n", nil, func(r io.Reader) (int64, error) {
			b, err := io.ReadAll(r)
			if err == nil {
				pid, err = strconv.Atoi(string(b))
			}
			return int64(len(b)), err
		})
		if err == nil && status != 200 {
			err = errStatus(status)
		}
		return pid, err
	}

	last := 0
	for i := range kills {
		// Wait for a live child other than the one killed last, that serves.
		var pid int
		deadline := time.Now().Add(30 * time.Second)
		poll.setDeadline(deadline.Add(time.Second))
		for {
			p, err := childPid()
			if err == nil && p != 0 && p != last && smallOp(poll) == nil {
				pid = p
				break
			}
			if time.Now().After(deadline) {
				return finishRestarts(res), fmt.Errorf("kill %d: no new child serving within 30s (last pid %d, err %v)", i+1, last, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		// Let the new child settle. subproc restarts a child at once only
		// if it served for a second (a module whose children keep dying
		// younger backs off): (d) measures the restart of a healthy module.
		time.Sleep(1200 * time.Millisecond)

		poll.setDeadline(time.Now().Add(30 * time.Second))
		t0 := time.Now()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return finishRestarts(res), fmt.Errorf("kill %d: %v", i+1, err)
		}
		for {
			status, n, err := poll.get("/small")
			if err == nil && status == 200 && n == int64(len(smallBody)) {
				break
			}
			if err != nil {
				res.FailedPolls++
			} else {
				res.Non200++
			}
			if time.Since(t0) > 30*time.Second {
				return finishRestarts(res), fmt.Errorf("kill %d: no 200 within 30s of the kill (last: status %d, err %v)", i+1, status, err)
			}
			time.Sleep(time.Millisecond)
		}
		res.SamplesMs = append(res.SamplesMs, float64(time.Since(t0))/1e6)
		last = pid
	}
	return finishRestarts(res), nil
}

func finishRestarts(r RestartResult) RestartResult {
	if len(r.SamplesMs) == 0 {
		return r
	}
	s := slices.Clone(r.SamplesMs)
	slices.Sort(s)
	r.MinMs, r.MaxMs = s[0], s[len(s)-1]
	if len(s)%2 == 1 {
		r.MedianMs = s[len(s)/2]
	} else {
		r.MedianMs = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return r
}

// Machine describes where the results were measured.
type Machine struct {
	Date        string  `json:"date"`
	GoVersion   string  `json:"go_version"`
	GOOS        string  `json:"goos"`
	GOARCH      string  `json:"goarch"`
	GOMAXPROCS  int     `json:"gomaxprocs"`
	NumCPU      int     `json:"num_cpu"`
	CPUModel    string  `json:"cpu_model"`
	Kernel      string  `json:"kernel"`
	LoadAvg     string  `json:"loadavg_at_start"`
	MemTotalMiB float64 `json:"mem_total_mib"`
	Revision    string  `json:"revision,omitempty"` // git HEAD of the working tree, "+dirty" if modified
}

func machineInfo() Machine {
	m := Machine{
		Date:       time.Now().UTC().Format(time.RFC3339),
		GoVersion:  runtime.Version(),
		GOOS:       runtime.GOOS,
		GOARCH:     runtime.GOARCH,
		GOMAXPROCS: runtime.GOMAXPROCS(0),
		NumCPU:     runtime.NumCPU(),
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.LoadAvg = loadAvg()
	if kb, ok := statusKBFile("/proc/meminfo", "MemTotal:"); ok {
		m.MemTotalMiB = float64(kb) / 1024
	}
	if out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.Revision = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			m.Revision += "+dirty"
		}
	}
	return m
}

// loadAvg returns the first three figures of /proc/loadavg, or "".
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
