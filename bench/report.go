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
	Machine  Machine      `json:"machine"`
	Config   Config       `json:"config"`
	Finished string       `json:"finished"`
	Peers    []PeerResult `json:"peers"`
	// Ratios holds, per peer and metric key, the peer's figure divided by
	// inproc's (filled in by writeResults).
	Ratios map[string]map[string]float64 `json:"ratios_to_inproc,omitempty"`
}

// PeerResult is one peer's figures. A nil workload was not run: see
// NotApplicable and Errors.
type PeerResult struct {
	Name          string            `json:"name"`
	Small1        *LoadResult       `json:"small_1_client,omitempty"`
	Small64       *LoadResult       `json:"small_64_clients,omitempty"`
	Echo          *LoadResult       `json:"echo,omitempty"`
	Stream        *StreamResult     `json:"stream,omitempty"`
	Restart       *RestartResult    `json:"restart,omitempty"`
	RSS           *RSSResult        `json:"rss,omitempty"`
	NotApplicable map[string]string `json:"not_applicable,omitempty"` // workload → why
	Errors        []string          `json:"errors,omitempty"`
}

// A metric is one row of the table.
type metric struct {
	key      string
	workload string // the workload it belongs to, as in notApplicable
	group    string // the table's first column
	label    string // what is measured, with its unit
	higher   bool   // higher is better
	ratio    bool   // shown as a ratio to inproc
	format   func(float64) string
	get      func(*PeerResult) (float64, bool)
}

func loadMetric(p *PeerResult, which string) *LoadResult {
	switch which {
	case "small1":
		return p.Small1
	case "small64":
		return p.Small64
	default:
		return p.Echo
	}
}

func loadGet(which string, f func(*LoadResult) float64) func(*PeerResult) (float64, bool) {
	return func(p *PeerResult) (float64, bool) {
		if r := loadMetric(p, which); r != nil {
			return f(r), true
		}
		return 0, false
	}
}

// metrics lists the table's rows in order.
var metrics = []metric{
	{"small1_rps", "small", "(a) GET /small, 1 client", "req/s", true, true, fmtInt, loadGet("small1", func(r *LoadResult) float64 { return r.ReqPerSec })},
	{"small1_p50", "small", "", "p50 latency, µs", false, true, fmtInt, loadGet("small1", func(r *LoadResult) float64 { return r.P50us })},
	{"small1_p99", "small", "", "p99 latency, µs", false, true, fmtInt, loadGet("small1", func(r *LoadResult) float64 { return r.P99us })},
	{"small64_rps", "small", "(a) GET /small, 64 clients", "req/s", true, true, fmtInt, loadGet("small64", func(r *LoadResult) float64 { return r.ReqPerSec })},
	{"small64_p50", "small", "", "p50 latency, µs", false, true, fmtInt, loadGet("small64", func(r *LoadResult) float64 { return r.P50us })},
	{"small64_p99", "small", "", "p99 latency, µs", false, true, fmtInt, loadGet("small64", func(r *LoadResult) float64 { return r.P99us })},
	{"echo_rps", "echo", "(b) POST /echo 64 KiB, 16 clients", "req/s", true, true, fmtInt, loadGet("echo", func(r *LoadResult) float64 { return r.ReqPerSec })},
	{"echo_mbps", "echo", "", "MB/s (request bodies)", true, true, fmtMB, loadGet("echo", func(r *LoadResult) float64 { return r.MBPerSec })},
	{"echo_errors", "echo", "", "errors", false, false, fmtInt, loadGet("echo", func(r *LoadResult) float64 { return float64(r.Errors) })},
	{"stream_mbps", "stream", "(c) GET /stream, one response", "MB/s", true, true, fmtMB, func(p *PeerResult) (float64, bool) {
		if p.Stream == nil {
			return 0, false
		}
		return p.Stream.MBPerSec, true
	}},
	{"restart_ms", "restart", "(d) SIGKILL child → next 200", "median ms", false, false, fmtMs, func(p *PeerResult) (float64, bool) {
		if p.Restart == nil {
			return 0, false
		}
		return p.Restart.MedianMs, true
	}},
	{"rss_mib", "rss", "(e) peak RSS during (a), parent + child", "MiB (sampled)", false, true, fmtMiB, func(p *PeerResult) (float64, bool) {
		if p.RSS == nil {
			return 0, false
		}
		return p.RSS.PeakMiB, true
	}},
	{"hwm_mib", "rss", "", "MiB (sum of VmHWM)", false, true, fmtMiB, func(p *PeerResult) (float64, bool) {
		if p.RSS == nil {
			return 0, false
		}
		return p.RSS.HWMMiB, true
	}},
	{"pss_mib", "rss", "", "MiB PSS (shared pages once)", false, true, fmtMiB, func(p *PeerResult) (float64, bool) {
		if p.RSS == nil || p.RSS.PSSPeakMiB == 0 {
			return 0, false
		}
		return p.RSS.PSSPeakMiB, true
	}},
}

// inproc returns the inproc peer's result, or nil.
func (r *Results) inproc() *PeerResult {
	for i := range r.Peers {
		if r.Peers[i].Name == "inproc" {
			return &r.Peers[i]
		}
	}
	return nil
}

// ratio returns m of p divided by m of inproc.
func (r *Results) ratio(m metric, p *PeerResult) (float64, bool) {
	base := r.inproc()
	if base == nil || !m.ratio {
		return 0, false
	}
	b, ok1 := m.get(base)
	v, ok2 := m.get(p)
	if !ok1 || !ok2 || b == 0 {
		return 0, false
	}
	return v / b, true
}

// computeRatios fills r.Ratios.
func (r *Results) computeRatios() {
	r.Ratios = map[string]map[string]float64{}
	for i := range r.Peers {
		p := &r.Peers[i]
		for _, m := range metrics {
			if x, ok := r.ratio(m, p); ok {
				if r.Ratios[p.Name] == nil {
					r.Ratios[p.Name] = map[string]float64{}
				}
				r.Ratios[p.Name][m.key] = x
			}
		}
	}
}

// cell is the table's text for metric m of peer p.
func (r *Results) cell(m metric, p *PeerResult) string {
	v, ok := m.get(p)
	if !ok {
		if _, na := p.NotApplicable[m.workload]; na {
			return "n/a"
		}
		return "failed"
	}
	s := m.format(v)
	if x, ok := r.ratio(m, p); ok && p.Name != "inproc" {
		s += fmt.Sprintf(" (%s×)", fmtRatio(x))
	}
	return s
}

// Markdown renders the results as a markdown document: the machine, the
// table, and notes.
func (r *Results) Markdown() string {
	var b strings.Builder
	m := r.Machine
	b.WriteString("# subproc benchmark results\n\n")
	mode := "full"
	if r.Config.Quick {
		mode = "quick (smoke test: short runs, noisy)"
	}
	fmt.Fprintf(&b, "- Date: %s; run: %s\n", m.Date, mode)
	fmt.Fprintf(&b, "- Machine: %s, %d CPUs, GOMAXPROCS %d, %.0f MiB, Linux %s, load average at start %s\n",
		orDash(m.CPUModel), m.NumCPU, m.GOMAXPROCS, m.MemTotalMiB, orDash(m.Kernel), orDash(m.LoadAvg))
	fmt.Fprintf(&b, "- Go: %s %s/%s; subproc revision: %s\n", m.GoVersion, m.GOOS, m.GOARCH, orDash(m.Revision))
	fmt.Fprintf(&b, "- Loads: %v warmup + %v timed each; echo %d KiB × %d clients; stream %d MiB in %d KiB flushed writes; %d kills\n\n",
		r.Config.Warmup, r.Config.Duration, r.Config.EchoBytes>>10, r.Config.EchoClients,
		r.Config.StreamBytes>>20, r.Config.StreamChunk>>10, r.Config.Kills)

	b.WriteString("| Workload | Metric |")
	for _, p := range r.Peers {
		fmt.Fprintf(&b, " %s |", p.Name)
	}
	b.WriteString("\n|---|---|")
	for range r.Peers {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, mt := range metrics {
		fmt.Fprintf(&b, "| %s | %s |", mt.group, mt.label)
		for i := range r.Peers {
			fmt.Fprintf(&b, " %s |", r.cell(mt, &r.Peers[i]))
		}
		b.WriteString("\n")
	}

	b.WriteString("\n(×) is the figure divided by inproc's in this run: for req/s and MB/s higher is better, for latency and memory lower is better.\n")
	b.WriteString("Latency is from the request's first byte written to the response's last byte read, at the load generator (a separate process).\n")
	b.WriteString("MB/s is 10⁶ bytes per second; for (b) it counts the request bodies sent (the same bytes come back).\n")

	var notes []string
	for _, p := range r.Peers {
		if p.Restart != nil {
			notes = append(notes, fmt.Sprintf("%s: restart times %s ms (min %s, max %s); %d non-200 answers and %d failed polls while down",
				p.Name, joinMs(p.Restart.SamplesMs), fmtMs(p.Restart.MinMs), fmtMs(p.Restart.MaxMs), p.Restart.Non200, p.Restart.FailedPolls))
		}
		for _, w := range sortedKeys(p.NotApplicable) {
			notes = append(notes, fmt.Sprintf("%s: %s is n/a: %s", p.Name, w, p.NotApplicable[w]))
		}
		for _, l := range []*LoadResult{p.Small1, p.Small64, p.Echo} {
			if l != nil && l.Errors > 0 {
				notes = append(notes, fmt.Sprintf("%s: %d errors with %d clients; first: %s", p.Name, l.Errors, l.Clients, l.FirstErr))
			}
		}
		for _, e := range p.Errors {
			notes = append(notes, fmt.Sprintf("%s: error: %s", p.Name, e))
		}
	}
	if len(notes) > 0 {
		b.WriteString("\nNotes:\n\n")
		for _, n := range notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String()
}

// writeResults writes results.md, results.json and results.svg to dir.
func writeResults(dir string, r *Results, md string) error {
	r.computeRatios()
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
// table.
func replot(from, dir string, stdout io.Writer) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
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
	for _, w := range []string{"small", "echo", "stream", "restart", "rss"} {
		if _, ok := m[w]; ok {
			keys = append(keys, w)
		}
	}
	return keys
}
