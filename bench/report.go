package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
)

// Results is everything a run measured; results.json is its JSON.
type Results struct {
	Machine  Machine `json:"machine"`
	Config   Config  `json:"config"`
	Finished string  `json:"finished"`
	// LoadAvgEnd is /proc/loadavg's first three figures when the last
	// round ended (Machine has them at the start).
	LoadAvgEnd string `json:"loadavg_at_end,omitempty"`
	// Rounds holds every round's raw figures, in the order they ran; in
	// each, the peers ran one after the other, in Config.Peers's order.
	Rounds []Round `json:"rounds"`
	// Summary holds, per peer and metric key, the figures over the rounds
	// (see Summary). It is computed from Rounds (by summarize, again when
	// -from rereads the file) and written for the reader's convenience.
	Summary map[string]map[string]Summary `json:"summary,omitempty"`
}

// PeerResult is one peer's figures in one round. A nil workload was not
// run: see NotApplicable and Errors.
type PeerResult struct {
	Name          string            `json:"name"`
	Small1        *LoadResult       `json:"small_1_client,omitempty"`
	Small64       *LoadResult       `json:"small_64_clients,omitempty"`
	Echo          *LoadResult       `json:"echo,omitempty"`
	Stream        *StreamResult     `json:"stream,omitempty"`
	WSEcho1       *LoadResult       `json:"ws_echo_1_conn,omitempty"`
	WSEcho64      *LoadResult       `json:"ws_echo_64_conns,omitempty"`
	WSStream      *StreamResult     `json:"ws_stream,omitempty"`
	Restart       *RestartResult    `json:"restart,omitempty"`
	RSS           *RSSResult        `json:"rss,omitempty"`
	NotApplicable map[string]string `json:"not_applicable,omitempty"` // workload → why
	Errors        []string          `json:"errors,omitempty"`
}

// A metric is one figure of every peer in every round: a row of the main
// table, or (the CPU time of each process) a cell of the CPU table.
type metric struct {
	key      string
	workload string // the workload it belongs to, as in notApplicable
	group    string // the table's first column
	label    string // what is measured, with its unit
	higher   bool   // higher is better
	ratio    bool   // has a ratio to inproc
	table    bool   // a row of the main table
	format   func(float64) string
	get      func(*PeerResult) (float64, bool)
}

// A timedLoad is one of the fixed-duration loads of a PeerResult.
type timedLoad struct {
	key, workload, group string
	unit                 string // what a request is, for the CPU rows
	get                  func(*PeerResult) *LoadResult
}

var timedLoads = []timedLoad{
	{"small1", "small", "(a) GET /small, 1 client", "request", func(p *PeerResult) *LoadResult { return p.Small1 }},
	{"small64", "small", "(a) GET /small, 64 clients", "request", func(p *PeerResult) *LoadResult { return p.Small64 }},
	{"echo", "echo", "(b) POST /echo 64 KiB, 16 clients", "request", func(p *PeerResult) *LoadResult { return p.Echo }},
	{"wsecho1", "ws", "(f) WebSocket echo 64 B, 1 connection", "message", func(p *PeerResult) *LoadResult { return p.WSEcho1 }},
	{"wsecho64", "ws", "(f) WebSocket echo 64 B, 64 connections", "message", func(p *PeerResult) *LoadResult { return p.WSEcho64 }},
}

// A timedStream is one of the stream workloads of a PeerResult.
type timedStream struct {
	key, workload, group string
	get                  func(*PeerResult) *StreamResult
}

var timedStreams = []timedStream{
	{"stream", "stream", "(c) GET /stream, one response", func(p *PeerResult) *StreamResult { return p.Stream }},
	{"wsstream", "ws", "(g) WebSocket stream, 64 KiB messages", func(p *PeerResult) *StreamResult { return p.WSStream }},
}

func findLoad(key string) timedLoad {
	for _, l := range timedLoads {
		if l.key == key {
			return l
		}
	}
	panic("no load " + key)
}

func findStream(key string) timedStream {
	for _, s := range timedStreams {
		if s.key == key {
			return s
		}
	}
	panic("no stream " + key)
}

// loadFigure returns the metric of figure f of load l.
func loadFigure(l timedLoad, suffix, group, label string, higher, ratio bool, format func(float64) string, f func(*LoadResult) float64) metric {
	return metric{l.key + "_" + suffix, l.workload, group, label, higher, ratio, true, format, func(p *PeerResult) (float64, bool) {
		if r := l.get(p); r != nil {
			return f(r), true
		}
		return 0, false
	}}
}

// cpuMetrics returns the CPU metrics of a workload whose CPU use and
// units of work (requests, GB) get returns, with the figure per unit
// scaled by scale (1e6 for µs, 1e3 for ms): the server's (parent + child)
// as a row of the main table with its ratio, and each process's for the
// CPU table.
func cpuMetrics(key, workload, label string, scale float64, get func(*PeerResult) (*CPUUse, float64)) []metric {
	per := func(f func(*CPUUse) float64, needChild bool) func(*PeerResult) (float64, bool) {
		return func(p *PeerResult) (float64, bool) {
			c, units := get(p)
			if c == nil || units <= 0 || (needChild && c.Children == 0) {
				return 0, false
			}
			return f(c) / units * scale, true
		}
	}
	return []metric{
		{key + "_cpu", workload, "", label, false, true, true, fmtInt, per(func(c *CPUUse) float64 { return c.ParentSec + c.ChildSec }, false)},
		{key + "_cpu_parent", workload, "", "", false, false, false, fmtInt, per(func(c *CPUUse) float64 { return c.ParentSec }, false)},
		{key + "_cpu_child", workload, "", "", false, false, false, fmtInt, per(func(c *CPUUse) float64 { return c.ChildSec }, true)},
		{key + "_cpu_loadgen", workload, "", "", false, false, false, fmtInt, per(func(c *CPUUse) float64 { return c.LoadgenSec }, false)},
	}
}

func loadCPU(l timedLoad) []metric {
	return cpuMetrics(l.key, l.workload, "server CPU, µs/"+l.unit+" (parent + child)", 1e6, func(p *PeerResult) (*CPUUse, float64) {
		if r := l.get(p); r != nil {
			return r.CPU, float64(r.Requests)
		}
		return nil, 0
	})
}

func streamCPU(s timedStream) []metric {
	return cpuMetrics(s.key, s.workload, "server CPU, ms/GB (parent + child)", 1e3, func(p *PeerResult) (*CPUUse, float64) {
		if r := s.get(p); r != nil {
			return r.CPU, float64(r.Bytes) / 1e9
		}
		return nil, 0
	})
}

func streamRate(s timedStream) metric {
	return metric{s.key + "_mbps", s.workload, s.group, "MB/s", true, true, true, fmtMB, func(p *PeerResult) (float64, bool) {
		if r := s.get(p); r != nil {
			return r.MBPerSec, true
		}
		return 0, false
	}}
}

func rssMetric(key, group, label string, f func(*RSSResult) float64) metric {
	return metric{key, "rss", group, label, false, true, true, fmtMiB, func(p *PeerResult) (float64, bool) {
		if p.RSS == nil || f(p.RSS) == 0 {
			return 0, false
		}
		return f(p.RSS), true
	}}
}

// latencyAndRate returns a load's rate, p50 and p99 rows.
func latencyAndRate(l timedLoad, rate string) []metric {
	return []metric{
		loadFigure(l, "rps", l.group, rate, true, true, fmtInt, func(r *LoadResult) float64 { return r.ReqPerSec }),
		loadFigure(l, "p50", "", "p50 latency, µs", false, true, fmtInt, func(r *LoadResult) float64 { return r.P50us }),
		loadFigure(l, "p99", "", "p99 latency, µs", false, true, fmtInt, func(r *LoadResult) float64 { return r.P99us }),
	}
}

// metrics lists every metric, the main table's rows in order.
var metrics = func() []metric {
	var ms []metric
	for _, k := range []string{"small1", "small64"} {
		l := findLoad(k)
		ms = append(ms, latencyAndRate(l, "req/s")...)
		ms = append(ms, loadCPU(l)...)
	}
	echo := findLoad("echo")
	ms = append(ms,
		loadFigure(echo, "rps", echo.group, "req/s", true, true, fmtInt, func(r *LoadResult) float64 { return r.ReqPerSec }),
		loadFigure(echo, "mbps", "", "MB/s (request bodies)", true, true, fmtMB, func(r *LoadResult) float64 { return r.MBPerSec }),
		loadFigure(echo, "errors", "", "errors", false, false, fmtInt, func(r *LoadResult) float64 { return float64(r.Errors) }))
	ms = append(ms, loadCPU(echo)...)
	stream := findStream("stream")
	ms = append(ms, streamRate(stream))
	ms = append(ms, streamCPU(stream)...)
	ms = append(ms,
		metric{"restart_ms", "restart", "(d) SIGKILL child → next 200", "median ms", false, false, true, fmtMs, func(p *PeerResult) (float64, bool) {
			if p.Restart == nil {
				return 0, false
			}
			return p.Restart.MedianMs, true
		}},
		rssMetric("rss_mib", "(e) peak RSS during (a), parent + child", "MiB (sampled)", func(r *RSSResult) float64 { return r.PeakMiB }),
		rssMetric("hwm_mib", "", "MiB (sum of VmHWM)", func(r *RSSResult) float64 { return r.HWMMiB }),
		rssMetric("pss_mib", "", "MiB PSS (shared pages once)", func(r *RSSResult) float64 { return r.PSSPeakMiB }))
	for _, k := range []string{"wsecho1", "wsecho64"} {
		l := findLoad(k)
		ms = append(ms, latencyAndRate(l, "messages/s")...)
		ms = append(ms, loadCPU(l)...)
	}
	ws := findStream("wsstream")
	ms = append(ms, streamRate(ws))
	ms = append(ms, streamCPU(ws)...)
	return ms
}()

// metricByKey returns the metric named key.
func metricByKey(key string) metric {
	for _, m := range metrics {
		if m.key == key {
			return m
		}
	}
	panic("no metric " + key)
}

// cell is the main table's text for metric m of peer: the median over
// the rounds and, but for inproc, the median ratio to inproc with its
// range over the rounds.
func (r *Results) cell(m metric, peer string) string {
	s, ok := r.Summary[peer][m.key]
	if !ok || len(s.Values) == 0 {
		if r.notApplicable(peer, m.workload) != "" {
			return "n/a"
		}
		return "failed"
	}
	out := m.format(s.Median)
	if n := len(s.Values); n < len(r.Rounds) {
		out += fmt.Sprintf(" [%d of %d rounds]", n, len(r.Rounds))
	}
	if len(s.Ratios) > 0 && peer != "inproc" {
		out += " · " + ratioText(s)
	}
	return out
}

// ratioText is "0.58×", with " (0.52–0.63)", the range of the per-round
// ratios, when there were several rounds.
func ratioText(s Summary) string {
	t := fmtRatio(s.Ratio) + "×"
	if len(s.Ratios) > 1 {
		t += fmt.Sprintf(" (%s–%s)", fmtRatio(s.RatioMin), fmtRatio(s.RatioMax))
	}
	return t
}

// cpuCell is the CPU table's text for the workload key of peer: the
// median over the rounds of each process's CPU time per unit.
func (r *Results) cpuCell(key, workload, peer string) string {
	var parts []string
	for _, who := range []string{"parent", "child", "loadgen"} {
		if s, ok := r.Summary[peer][key+"_cpu_"+who]; ok && len(s.Values) > 0 {
			parts = append(parts, who+" "+fmtInt(s.Median))
		}
	}
	if len(parts) > 0 {
		return strings.Join(parts, ", ")
	}
	if r.notApplicable(peer, workload) != "" {
		return "n/a"
	}
	return "failed"
}

// Markdown renders the results as a markdown document: the machine, the
// main table, the CPU table, the goals, and notes.
func (r *Results) Markdown() string {
	var b strings.Builder
	m := r.Machine
	c := r.Config
	peers := r.peerNames()
	b.WriteString("# subproc benchmark results\n\n")
	mode := "full"
	if c.Quick {
		mode = "quick (smoke test: short runs, noisy)"
	}
	fmt.Fprintf(&b, "- Date: %s; run: %s; finished %s\n", m.Date, mode, orDash(r.Finished))
	fmt.Fprintf(&b, "- Machine: %s, %d CPUs, GOMAXPROCS %d, %.0f MiB, Linux %s, load average at start %s, at end %s\n",
		orDash(m.CPUModel), m.NumCPU, m.GOMAXPROCS, m.MemTotalMiB, orDash(m.Kernel), orDash(m.LoadAvg), orDash(r.LoadAvgEnd))
	fmt.Fprintf(&b, "- Go: %s %s/%s; subproc revision: %s\n", m.GoVersion, m.GOOS, m.GOARCH, orDash(m.Revision))
	fmt.Fprintf(&b, "- Loads: %v warmup + %v timed each; echo %d KiB × %d clients; stream %d MiB in %d KiB flushed writes; WebSocket echo of %d B messages, stream of %d MiB in %d KiB messages; %d kills\n",
		c.Warmup, c.Duration, c.EchoBytes>>10, c.EchoClients,
		c.StreamBytes>>20, c.StreamChunk>>10, c.WSEchoBytes, c.StreamBytes>>20, c.StreamChunk>>10, c.Kills)
	fmt.Fprintf(&b, "- Rounds: %d, the peers interleaved (each round: %s), each peer with a fresh server process per round\n\n",
		len(r.Rounds), strings.Join(peers, ", "))

	tableHead(&b, "Metric", "---:", peers)
	for _, mt := range metrics {
		if !mt.table || !c.measures(mt.workload) {
			continue
		}
		fmt.Fprintf(&b, "| %s | %s |", mt.group, mt.label)
		for _, p := range peers {
			fmt.Fprintf(&b, " %s |", r.cell(mt, p))
		}
		b.WriteString("\n")
	}
	b.WriteString("\nEach figure is the median over the rounds. `· 0.58× (0.52–0.63)` is the median of the per-round ratios to inproc's figure in the same round, and their range: for req/s, messages/s and MB/s higher is better, for latency, CPU and memory lower is better.\n")
	b.WriteString("Latency is from the request's (message's) first byte written to the response's (echo's) last byte read, at the load generator (a separate process).\n")
	b.WriteString("MB/s is 10⁶ bytes per second, GB 10⁹ bytes; for (b) MB/s counts the request bodies sent (the same bytes come back).\n")
	b.WriteString("Server CPU is user + system time of the server process and its descendants (from /proc/<pid>/stat), over each timed load, divided by the requests (messages, GB) it served.\n")

	b.WriteString("\n## CPU per unit of work, by process\n\n")
	b.WriteString("Median over the rounds, µs per request or message (ms per GB for the streams): the server process (parent), its descendants (child: for subproc the child and its watcher process) and the load generator.\n\n")
	tableHead(&b, "Unit", "---", peers)
	cpuRow := func(key, workload, group, unit string) {
		if !c.measures(workload) {
			return
		}
		fmt.Fprintf(&b, "| %s | %s |", group, unit)
		for _, p := range peers {
			fmt.Fprintf(&b, " %s |", r.cpuCell(key, workload, p))
		}
		b.WriteString("\n")
	}
	for _, key := range []string{"small1", "small64", "echo"} {
		l := findLoad(key)
		cpuRow(l.key, l.workload, l.group, "µs/"+l.unit)
	}
	cpuRow("stream", "stream", findStream("stream").group, "ms/GB")
	for _, key := range []string{"wsecho1", "wsecho64"} {
		l := findLoad(key)
		cpuRow(l.key, l.workload, l.group, "µs/"+l.unit)
	}
	cpuRow("wsstream", "ws", findStream("wsstream").group, "ms/GB")

	if goals := r.goals(); len(goals) > 0 {
		b.WriteString("\n## Goals\n\n")
		for _, g := range goals {
			fmt.Fprintf(&b, "- %s\n", g)
		}
	}

	if notes := r.notes(); len(notes) > 0 {
		b.WriteString("\nNotes:\n\n")
		for _, n := range notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String()
}

// A goal compares one metric of subproc's with another peer's, round by
// round: as a ratio (subproc ÷ the other) or, if diff, as a difference
// (subproc − the other), which must be at least (atLeast) or at most the
// bound.
type goal struct {
	text    string // what is compared, for the report
	key     string // the metric
	peer    string // the other peer
	diff    bool
	atLeast bool
	bound   float64
}

// issueGoals are the goals of the performance issue (see the README's
// Performance section).
var issueGoals = []goal{
	{"(a) GET /small, 1 client: p50 latency added to inproc's ≤ 60 µs", "small1_p50", "inproc", true, false, 60},
	{"(a) GET /small, 64 clients: req/s ≥ 0.75× inproc's", "small64_rps", "inproc", false, true, 0.75},
	{"(a) GET /small, 64 clients: req/s ≥ 2× uds's", "small64_rps", "uds", false, true, 2},
	{"(b) POST /echo: req/s ≥ 0.7× inproc's", "echo_rps", "inproc", false, true, 0.7},
	{"(c) GET /stream: MB/s ≥ 0.55× inproc's", "stream_mbps", "inproc", false, true, 0.55},
	{"(c) GET /stream: MB/s ≥ 0.9× pipe's", "stream_mbps", "pipe", false, true, 0.9},
	{"(d) restart after SIGKILL: median ≤ uds's", "restart_ms", "uds", false, false, 1},
	{"(e) peak RSS (sampled) ≤ 2× inproc's", "rss_mib", "inproc", false, false, 2},
	{"(f) WebSocket echo, 64 connections: messages/s ≥ uds's", "wsecho64_rps", "uds", false, true, 1},
	{"(g) WebSocket stream: MB/s ≥ 0.6× inproc's", "wsstream_mbps", "inproc", false, true, 0.6},
}

// goals states each of issueGoals that the run measured, met or not by
// the median over the rounds, and in how many rounds.
func (r *Results) goals() []string {
	var out []string
	for _, g := range issueGoals {
		m := metricByKey(g.key)
		if !r.Config.measures(m.workload) {
			continue
		}
		var xs []float64
		for _, rd := range r.Rounds {
			ps, po := rd.peer("subproc"), rd.peer(g.peer)
			if ps == nil || po == nil {
				continue
			}
			vs, ok1 := m.get(ps)
			vo, ok2 := m.get(po)
			switch {
			case !ok1 || !ok2:
			case g.diff:
				xs = append(xs, vs-vo)
			case vo != 0:
				xs = append(xs, vs/vo)
			}
		}
		if len(xs) == 0 {
			continue
		}
		ok := func(x float64) bool {
			if g.atLeast {
				return x >= g.bound
			}
			return x <= g.bound
		}
		met := 0
		for _, x := range xs {
			if ok(x) {
				met++
			}
		}
		med, lo, hi := medianRange(xs)
		var got string
		if g.diff {
			got = fmt.Sprintf("%+.0f (%+.0f to %+.0f)", med, lo, hi)
		} else {
			got = fmtRatio(med) + "×"
			if len(xs) > 1 {
				got += fmt.Sprintf(" (%s–%s)", fmtRatio(lo), fmtRatio(hi))
			}
		}
		w := "not met"
		if ok(med) {
			w = "met"
		}
		op := "÷"
		if g.diff {
			op = "−"
		}
		out = append(out, fmt.Sprintf("%s: subproc %s, %s %s; subproc %s %s %s: **%s** (in %d of %d rounds)",
			g.text, m.format(r.Summary["subproc"][g.key].Median), g.peer, m.format(r.Summary[g.peer][g.key].Median),
			op, g.peer, got, w, met, len(xs)))
	}
	return out
}

// notes lists the restart samples, the workloads that are n/a and why,
// and every error, by round.
func (r *Results) notes() []string {
	var notes []string
	for _, name := range r.peerNames() {
		var samples []string
		non200, failed := 0, 0
		for _, rd := range r.Rounds {
			if p := rd.peer(name); p != nil && p.Restart != nil {
				samples = append(samples, fmt.Sprintf("round %d: %s", rd.Round, joinMs(p.Restart.SamplesMs)))
				non200 += p.Restart.Non200
				failed += p.Restart.FailedPolls
			}
		}
		if len(samples) > 0 {
			notes = append(notes, fmt.Sprintf("%s: restart times in ms, %s; %d non-200 answers and %d failed polls while down, in all",
				name, strings.Join(samples, "; "), non200, failed))
		}
		if len(r.Rounds) > 0 {
			if p := r.Rounds[0].peer(name); p != nil {
				for _, w := range sortedKeys(p.NotApplicable) {
					notes = append(notes, fmt.Sprintf("%s: %s is n/a: %s", name, w, p.NotApplicable[w]))
				}
			}
		}
	}
	for _, rd := range r.Rounds {
		if n := rd.noise(r.Config.MaxSteal); n != "" {
			notes = append(notes, fmt.Sprintf("round %d: %s", rd.Round, n))
		}
	}
	for _, rd := range r.Rounds {
		for i := range rd.Peers {
			p := &rd.Peers[i]
			for _, l := range timedLoads {
				lr := l.get(p)
				if lr == nil {
					continue
				}
				if lr.Errors > 0 {
					notes = append(notes, fmt.Sprintf("round %d: %s: %d errors in %s; first: %s", rd.Round, p.Name, lr.Errors, l.group, lr.FirstErr))
				}
				if lr.CPUError != "" {
					notes = append(notes, fmt.Sprintf("round %d: %s: CPU of %s not measured: %s", rd.Round, p.Name, l.group, lr.CPUError))
				}
			}
			for _, s := range timedStreams {
				if sr := s.get(p); sr != nil && sr.CPUError != "" {
					notes = append(notes, fmt.Sprintf("round %d: %s: CPU of %s not measured: %s", rd.Round, p.Name, s.group, sr.CPUError))
				}
			}
			for _, e := range p.Errors {
				notes = append(notes, fmt.Sprintf("round %d: %s: error: %s", rd.Round, p.Name, e))
			}
		}
	}
	return notes
}

// noise says how much of the machine's CPU time, at most over the round's
// timed loads (the timings kept), the hypervisor stole, and where, and
// which loads were timed again for stealing more than maxSteal percent: ""
// if no load measured it.
func (rd *Round) noise(maxSteal float64) string {
	steal, where := -1.0, ""
	var retimed []string
	see := func(c *CPUUse, timings int, peer, group string) {
		if c != nil && c.StealPct > steal {
			steal, where = c.StealPct, peer+", "+group
		}
		if timings > 1 {
			retimed = append(retimed, fmt.Sprintf("%s, %s: %d timings", peer, group, timings))
		}
	}
	for i := range rd.Peers {
		p := &rd.Peers[i]
		for _, l := range timedLoads {
			if lr := l.get(p); lr != nil {
				see(lr.CPU, lr.Timings, p.Name, l.group)
			}
		}
		for _, st := range timedStreams {
			if sr := st.get(p); sr != nil {
				see(sr.CPU, sr.Timings, p.Name, st.group)
			}
		}
	}
	if steal < 0 {
		return ""
	}
	n := fmt.Sprintf("at most %.1f %% of the machine's CPU time during a timed load was stolen by the hypervisor (%s)", steal, where)
	if len(retimed) > 0 {
		n += fmt.Sprintf("; timed again for more than %g %% stolen, the least disturbed timing kept: %s", maxSteal, strings.Join(retimed, "; "))
	}
	return n
}

// writeResults writes results.md, results.json and results.svg to dir.
func writeResults(dir string, r *Results, md string) error {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"results.md":   []byte(md),
		"results.json": append(js, '\n'),
		"results.svg":  []byte(r.SVG()),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// replot rewrites the results in dir from a results.json, and prints the
// markdown.
func replot(from, dir string, stdout io.Writer) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	if len(r.Rounds) == 0 {
		return fmt.Errorf("%s has no rounds: is it from a version of bench before -rounds? Run the benchmark again", from)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	r.summarize()
	md := r.Markdown()
	if err := writeResults(dir, &r, md); err != nil {
		return err
	}
	_, err = fmt.Fprint(stdout, md)
	return err
}

func fmtInt(v float64) string {
	s := fmt.Sprintf("%.0f", math.Round(v))
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func fmtMB(v float64) string {
	if v >= 100 {
		return fmtInt(v)
	}
	return fmt.Sprintf("%.1f", v)
}

func fmtMs(v float64) string  { return fmt.Sprintf("%.1f", v) }
func fmtMiB(v float64) string { return fmt.Sprintf("%.1f", v) }

func fmtRatio(x float64) string {
	if x >= 10 {
		return fmt.Sprintf("%.0f", x)
	}
	return fmt.Sprintf("%.2f", x)
}

func joinMs(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmtMs(x)
	}
	return strings.Join(s, ", ")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func sortedKeys(m map[string]string) []string {
	var keys []string
	for _, w := range []string{"small", "echo", "stream", "ws", "restart", "rss"} {
		if _, ok := m[w]; ok {
			keys = append(keys, w)
		}
	}
	return keys
}

// tableHead writes the head of a table whose columns are Workload, second,
// and a column per peer, aligned as align ("---" or "---:").
func tableHead(b *strings.Builder, second, align string, peers []string) {
	fmt.Fprintf(b, "| Workload | %s |", second)
	for _, p := range peers {
		fmt.Fprintf(b, " %s |", p)
	}
	b.WriteString("\n|---|---|")
	for range peers {
		b.WriteString(align + "|")
	}
	b.WriteString("\n")
}
