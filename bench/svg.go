package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// The chart: hand-written SVG, grouped horizontal bars, one panel per kind
// of figure.

// peerColors are the bars' colours, by peer.
var peerColors = map[string]string{
	"inproc":   "#4c72b0",
	"uds":      "#dd8452",
	"goplugin": "#55a868",
	"pipe":     "#8172b3",
	"subproc":  "#c44e52",
}

func peerColor(name string) string {
	if c, ok := peerColors[name]; ok {
		return c
	}
	return "#777777"
}

// A panel is one chart: groups of bars on a common axis.
type panel struct {
	title  string
	axis   string  // the x axis's label
	ref    float64 // a dashed reference line at this value, 0 for none
	refTxt string
	groups []barGroup
}

type barGroup struct {
	label string
	bars  []bar
}

type bar struct {
	peer   string
	value  float64
	lo, hi float64 // the range over the rounds, drawn as a whisker when lo < hi
	ok     bool    // false: n/a or failed, shown as text
	text   string  // the value's label, or why there is none
}

// panels builds the chart's panels from the results' summary: medians
// over the rounds, and the per-round range of each ratio.
func (r *Results) panels() []panel {
	peers := r.peerNames()
	ratioGroups := func(keys []string, labels []string) []barGroup {
		var gs []barGroup
		for i, k := range keys {
			m := metricByKey(k)
			g := barGroup{label: labels[i]}
			for _, name := range peers {
				if name == "inproc" {
					continue
				}
				s, ok := r.Summary[name][k]
				ok = ok && len(s.Ratios) > 0
				b := bar{peer: name, value: s.Ratio, lo: s.RatioMin, hi: s.RatioMax, ok: ok, text: ratioText(s)}
				if !ok {
					b.text = r.cell(m, name)
				}
				g.bars = append(g.bars, b)
			}
			gs = append(gs, g)
		}
		return gs
	}
	absGroup := func(key, label, unit string, withInproc bool) barGroup {
		m := metricByKey(key)
		g := barGroup{label: label}
		for _, name := range peers {
			if name == "inproc" && !withInproc {
				continue
			}
			s, ok := r.Summary[name][key]
			ok = ok && len(s.Values) > 0
			_, lo, hi := medianRange(s.Values)
			b := bar{peer: name, value: s.Median, lo: lo, hi: hi, ok: ok, text: m.format(s.Median) + " " + unit}
			if !ok {
				b.text = r.cell(m, name)
			}
			g.bars = append(g.bars, b)
		}
		return g
	}
	return []panel{
		{
			title: "Throughput relative to inproc (higher is better; whiskers: range over the rounds)",
			axis:  "figure ÷ inproc's figure in the same round, median over the rounds", ref: 1, refTxt: "inproc",
			groups: ratioGroups(
				[]string{"small1_rps", "small64_rps", "echo_mbps", "stream_mbps", "wsecho1_rps", "wsecho64_rps", "wsstream_mbps"},
				[]string{"(a) GET /small, 1 client", "(a) GET /small, 64 clients", "(b) POST /echo 64 KiB ×16", "(c) GET /stream",
					"(f) WebSocket echo, 1 conn", "(f) WebSocket echo, 64 conns", "(g) WebSocket stream"}),
		},
		{
			title: "Latency relative to inproc (lower is better)",
			axis:  "figure ÷ inproc's figure in the same round, median over the rounds", ref: 1, refTxt: "inproc",
			groups: ratioGroups(
				[]string{"small1_p50", "small1_p99", "small64_p50", "small64_p99", "wsecho1_p50", "wsecho1_p99", "wsecho64_p50", "wsecho64_p99"},
				[]string{"(a) 1 client, p50", "(a) 1 client, p99", "(a) 64 clients, p50", "(a) 64 clients, p99",
					"(f) WS 1 conn, p50", "(f) WS 1 conn, p99", "(f) WS 64 conns, p50", "(f) WS 64 conns, p99"}),
		},
		{
			title: "Server CPU (parent + child) per unit of work relative to inproc (lower is better)",
			axis:  "figure ÷ inproc's figure in the same round, median over the rounds", ref: 1, refTxt: "inproc",
			groups: ratioGroups(
				[]string{"small1_cpu", "small64_cpu", "echo_cpu", "stream_cpu", "wsecho1_cpu", "wsecho64_cpu", "wsstream_cpu"},
				[]string{"(a) per request, 1 client", "(a) per request, 64 clients", "(b) per echo", "(c) per GB",
					"(f) per message, 1 conn", "(f) per message, 64 conns", "(g) per GB"}),
		},
		{
			title:  "Restart: SIGKILL of the child until the next 200, median (lower is better)",
			axis:   "milliseconds",
			groups: []barGroup{absGroup("restart_ms", "(d) restart", "ms", false)},
		},
		{
			title:  "Peak resident memory during (a), parent + child (lower is better)",
			axis:   "MiB (largest sampled sum of VmRSS)",
			groups: []barGroup{absGroup("rss_mib", "(e) peak RSS", "MiB", true)},
		},
	}
}

// dropNotApplicable removes from p the peers whose every bar is n/a (not
// failed): a panel shows only the peers it concerns.
func dropNotApplicable(p panel) panel {
	na := map[string]int{}
	for _, g := range p.groups {
		for _, br := range g.bars {
			if !br.ok && strings.HasSuffix(br.text, "n/a") {
				na[br.peer]++
			}
		}
	}
	var groups []barGroup
	for _, g := range p.groups {
		ng := barGroup{label: g.label}
		for _, br := range g.bars {
			if na[br.peer] < len(p.groups) {
				ng.bars = append(ng.bars, br)
			}
		}
		if len(ng.bars) > 0 {
			groups = append(groups, ng)
		}
	}
	p.groups = groups
	return p
}

// Layout of the chart, in pixels.
const (
	svgWidth    = 960
	plotLeft    = 250 // the bars' zero
	plotRight   = 720 // leaves room for the value labels and ranges
	barHeight   = 16
	barGap      = 3
	groupGap    = 14
	panelTitleH = 44
	axisH       = 44
	panelGap    = 24
)

// SVG renders the results as a standalone SVG document.
func (r *Results) SVG() string {
	var body strings.Builder
	y := 70.0
	for _, p := range r.panels() {
		if p = dropNotApplicable(p); len(p.groups) == 0 {
			continue
		}
		y = writePanel(&body, p, y) + panelGap
	}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%.0f" viewBox="0 0 %d %.0f" font-family="sans-serif" font-size="12">`+"\n",
		svgWidth, y, svgWidth, y)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	m := r.Machine
	fmt.Fprintf(&b, `<text x="16" y="24" font-size="17" font-weight="bold">%s</text>`+"\n", esc("subproc benchmark: every peer serves the same handler"))
	fmt.Fprintf(&b, `<text x="16" y="42" fill="#444">%s</text>`+"\n", esc(fmt.Sprintf("%s · %s · %d CPUs, GOMAXPROCS %d · %s · subproc %s%s",
		m.Date, orDash(m.CPUModel), m.NumCPU, m.GOMAXPROCS, m.GoVersion, orDash(m.Revision), roundsText(r))))
	// The legend.
	x := 16.0
	for _, name := range r.peerNames() {
		fmt.Fprintf(&b, `<rect x="%.0f" y="52" width="12" height="12" fill="%s"/>`, x, peerColor(name))
		fmt.Fprintf(&b, `<text x="%.0f" y="62">%s</text>`+"\n", x+16, esc(name))
		x += 24 + 8*float64(len(name)) + 12
	}
	b.WriteString(body.String())
	b.WriteString("</svg>\n")
	return b.String()
}

// writePanel draws p with its top at y and returns its bottom.
func writePanel(b *strings.Builder, p panel, y float64) float64 {
	fmt.Fprintf(b, `<text x="16" y="%.0f" font-size="14" font-weight="bold">%s</text>`+"\n", y+18, esc(p.title))
	top := y + panelTitleH
	maxV := p.ref
	for _, g := range p.groups {
		for _, br := range g.bars {
			if br.ok {
				maxV = max(maxV, br.value, br.hi)
			}
		}
	}
	step, maxAxis := niceAxis(maxV)
	scale := float64(plotRight-plotLeft) / maxAxis

	// The bars.
	cy := top
	for _, g := range p.groups {
		gh := float64(len(g.bars))*(barHeight+barGap) - barGap
		fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", plotLeft-10, cy+gh/2, esc(g.label))
		for _, br := range g.bars {
			if br.ok {
				w := math.Max(br.value*scale, 1)
				fmt.Fprintf(b, `<rect x="%d" y="%.1f" width="%.1f" height="%d" fill="%s"><title>%s</title></rect>`,
					plotLeft, cy, w, barHeight, peerColor(br.peer), esc(br.peer+": "+br.text))
				label := plotLeft + w + 4
				if br.lo < br.hi {
					lx, hx := float64(plotLeft)+br.lo*scale, float64(plotLeft)+br.hi*scale
					mid := cy + barHeight/2
					fmt.Fprintf(b, `<path d="M%.1f %.1fH%.1fM%.1f %.1fV%.1fM%.1f %.1fV%.1f" stroke="#222" fill="none"/>`,
						lx, mid, hx, lx, mid-4, mid+4, hx, mid-4, mid+4)
					label = math.Max(label, hx+4)
				}
				fmt.Fprintf(b, `<text x="%.1f" y="%.1f" dominant-baseline="middle">%s</text>`+"\n", label, cy+barHeight/2, esc(br.peer+" "+br.text))
			} else {
				fmt.Fprintf(b, `<text x="%d" y="%.1f" dominant-baseline="middle" fill="#888">%s</text>`+"\n", plotLeft+4, cy+barHeight/2, esc(br.peer+": "+br.text))
			}
			cy += barHeight + barGap
		}
		cy += groupGap - barGap
	}
	bottom := cy - groupGap + 6

	// The axis, its ticks and grid, and the reference line.
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>`+"\n", plotLeft, top-4, plotLeft, bottom)
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>`+"\n", plotLeft, bottom, plotRight, bottom)
	for v := 0.0; v <= maxAxis+step/2; v += step {
		tx := float64(plotLeft) + v*scale
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`, tx, top-4, tx, bottom)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333"/>`, tx, bottom, tx, bottom+4)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#333">%s</text>`+"\n", tx, bottom+16, tickLabel(v, step))
	}
	if p.ref > 0 {
		rx := float64(plotLeft) + p.ref*scale
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2" stroke-dasharray="5,3"/>`+"\n", rx, top-6, rx, bottom, peerColor("inproc"))
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="%s">%s</text>`+"\n", rx, top-8, peerColor("inproc"), esc(p.refTxt))
	}
	fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="middle" fill="#333">%s</text>`+"\n", (plotLeft+plotRight)/2, bottom+34, esc(p.axis))
	return bottom + axisH
}

// niceAxis returns a tick step of 1, 2, 2.5 or 5 times a power of ten
// and the axis's end, a multiple of the step at least maxV, with about
// five ticks.
func niceAxis(maxV float64) (step, end float64) {
	if maxV <= 0 || math.IsNaN(maxV) || math.IsInf(maxV, 0) {
		return 0.2, 1
	}
	raw := maxV / 5
	pow := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if step = m * pow; step >= raw {
			break
		}
	}
	end = math.Ceil(maxV/step) * step
	if end < maxV*1.001 {
		end += step
	}
	return step, end
}

// tickLabel formats a tick value with as many decimals as the step needs.
func tickLabel(v, step float64) string {
	for d := 0; d < 6; d++ {
		p := math.Pow(10, float64(d))
		if math.Abs(step*p-math.Round(step*p)) < 1e-6 {
			if d == 0 {
				return fmtInt(v)
			}
			return fmt.Sprintf("%.*f", d, v)
		}
	}
	return fmt.Sprintf("%g", v)
}

func esc(s string) string { return html.EscapeString(s) }

// roundsText says how many rounds the chart's medians are over.
func roundsText(r *Results) string {
	t := fmt.Sprintf(" · median of %d rounds", len(r.Rounds))
	if len(r.Rounds) == 1 {
		t = " · 1 round"
	}
	if r.Config.Quick {
		t += " · quick run"
	}
	return t
}
