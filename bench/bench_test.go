package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMain makes the test binary every process of the benchmark, as main
// does for the command: the end-to-end test re-executes it as server and
// children.
func TestMain(m *testing.M) {
	subproc.Main()
	if runRoleFromEnv() {
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestClient checks the load generator's client against net/http's
// server: fixed-length and chunked bodies, keep-alive, the echo check.
func TestClient(t *testing.T) {
	srv := httptest.NewServer(newHandler())
	defer srv.Close()
	c := newClient(strings.TrimPrefix(srv.URL, "http://"))
	defer c.close()
	c.setDeadline(time.Now().Add(time.Minute))

	for range 3 {
		require.NoError(t, smallOp(c))
	}
	for _, size := range []int{0, 1, 100, 64 << 10, 1 << 20} {
		require.NoError(t, echoOp(echoBody(size))(c), "echo of %d bytes", size)
	}
	for _, tc := range []struct {
		n     int64
		chunk int
	}{{0, 1}, {1, 1}, {100_000, 4096}, {3 << 20, 64 << 10}} {
		status, n, err := c.get(fmt.Sprintf("/stream?bytes=%d&chunk=%d", tc.n, tc.chunk))
		require.NoError(t, err, "stream %+v", tc)
		require.Equal(t, 200, status, "stream %+v", tc)
		require.Equal(t, tc.n, n, "stream %+v", tc)
	}
	status, _, err := c.get("/nothing")
	require.NoError(t, err)
	require.Equal(t, 404, status, "GET /nothing")
	require.NoError(t, smallOp(c), "after a 404")
}

// TestEchoMismatch checks that a wrong echo is an error.
func TestEchoMismatch(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		b[len(b)/2] ^= 1
		w.Write(b)
	}))
	defer srv.Close()
	c := newClient(strings.TrimPrefix(srv.URL, "http://"))
	defer c.close()
	require.ErrorIs(t, echoOp(echoBody(1000))(c), errMismatch)
}

// TestRunLoad checks the counting of a timed load and that its CPU time
// is measured: the server is this process, so the load generator's CPU
// is the parent's.
func TestRunLoad(t *testing.T) {
	srv := httptest.NewServer(newHandler())
	defer srv.Close()
	r := runLoad(4, 50*time.Millisecond, 300*time.Millisecond, 0, newCPUMeter(os.Getpid()), httpLoad(strings.TrimPrefix(srv.URL, "http://"), smallOp))
	require.Positive(t, r.Requests)
	assert.Zero(t, r.Errors, r.FirstErr)
	assert.Positive(t, r.P50us)
	assert.GreaterOrEqual(t, r.P99us, r.P50us)
	assert.GreaterOrEqual(t, r.MaxUs, r.P99us)
	require.NotNil(t, r.CPU, r.CPUError)
	assert.Positive(t, r.CPU.LoadgenSec)
	assert.GreaterOrEqual(t, r.CPU.ParentSec, 0.0)
}

// TestParseStatCPU checks the parsing of /proc/<pid>/stat, whose second
// field may hold spaces and parentheses.
func TestParseStatCPU(t *testing.T) {
	line := []byte("4242 (a (b) c) S 17 4242 4242 0 -1 4194560 1000 0 0 0 250 75 3 4 20 0 9 0 100 1000000 500\n")
	cpu, ppid, err := parseStatCPU(line)
	require.NoError(t, err)
	assert.Equal(t, 17, ppid)
	assert.Equal(t, 325*clockTick, cpu, "utime 250 + stime 75 ticks")

	for _, bad := range []string{"", "4242 (x S 17", "4242 (x) S 17 1 1"} {
		_, _, err := parseStatCPU([]byte(bad))
		assert.Error(t, err, "%q", bad)
	}

	cpu, ppid, err = procCPU(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, os.Getppid(), ppid)
	assert.GreaterOrEqual(t, cpu, time.Duration(0))
}

// TestMachineNoise checks the parsing of /proc/stat's first line and the
// share of the machine's time stolen that between derives from two
// readings.
func TestMachineNoise(t *testing.T) {
	m := parseMachine([]byte("cpu  100 5 50 800 10 3 2 30 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"))
	assert.Equal(t, machineTime{total: 1000, steal: 30, ok: true}, m)
	for _, bad := range []string{"", "cpu0 1 2 3 4 5 6 7 8", "cpu 1 2 3 4 5 6 7", "cpu 1 2 x 4 5 6 7 8"} {
		assert.False(t, parseMachine([]byte(bad)).ok, "%q", bad)
	}

	var mt cpuMeter
	a := cpuReading{machine: machineTime{total: 1000, steal: 10, ok: true}}
	b := cpuReading{machine: machineTime{total: 2000, steal: 60, ok: true}}
	use, why := mt.between(a, b)
	require.NotNil(t, use, why)
	assert.InDelta(t, 5.0, use.StealPct, 1e-9, "50 ticks stolen of 1000")

	a.machine.ok = false
	use, _ = mt.between(a, b)
	assert.Equal(t, -1.0, use.StealPct, "unknown without both readings")

	live := readMachine()
	require.True(t, live.ok, "/proc/stat")
	assert.Positive(t, live.total)
}

// TestCPUMeter checks that a meter counts a child's CPU time as the
// child's, and that a child that ends makes the reading an error.
func TestCPUMeter(t *testing.T) {
	pipe, err := startPipe()
	require.NoError(t, err)
	defer pipe.Close()
	m := newCPUMeter(os.Getpid())
	require.Contains(t, m.children, pipe.ChildPid())

	// The pipe child writes 1 GiB to its pipe: hundreds of ms of system
	// time, whatever the machine's load.
	before := m.read()
	require.NoError(t, before.err)
	const n = 1 << 30
	var req [16]byte
	binary.BigEndian.PutUint64(req[:8], n)
	binary.BigEndian.PutUint64(req[8:], 64<<10)
	_, err = pipe.stdin.Write(req[:])
	require.NoError(t, err)
	got, err := io.CopyN(io.Discard, pipe.stdout, n)
	require.NoError(t, err)
	require.EqualValues(t, n, got)
	after := m.read()
	use, why := m.between(before, after)
	require.NotNil(t, use, why)
	assert.Positive(t, use.ChildSec, "the child's CPU time")
	assert.Positive(t, use.LoadgenSec, "this process's CPU time")
	assert.Equal(t, len(m.children), use.Children)

	require.NoError(t, pipe.Close())
	_, why = m.between(before, m.read())
	assert.Contains(t, why, "ended during the load")
}

// TestWSEcho checks the WebSocket echo load against the handler, and that
// a wrong echo is an error.
func TestWSEcho(t *testing.T) {
	srv := httptest.NewServer(newHandler())
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	r := runLoad(3, 50*time.Millisecond, 300*time.Millisecond, 0, nil, wsEchoLoad(addr, echoBody(64)))
	require.Positive(t, r.Requests)
	assert.Zero(t, r.Errors, r.FirstErr)
	assert.Positive(t, r.P50us)
	assert.Nil(t, r.CPU, "no meter, no CPU figure")

	// A large message streams through the echo's 32 KiB buffer.
	c := wsEchoLoad(addr, echoBody(1<<20))(time.Now().Add(time.Minute))
	defer c.close()
	require.NoError(t, c.op())
	require.NoError(t, c.op())

	flip := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := wsUpgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer conn.Close()
		_, p, err := conn.ReadMessage()
		if err != nil {
			return
		}
		p[len(p)/2] ^= 1
		conn.WriteMessage(websocket.BinaryMessage, p)
	}))
	defer flip.Close()
	bad := wsEchoLoad(strings.TrimPrefix(flip.URL, "http://"), echoBody(64))(time.Now().Add(time.Minute))
	defer bad.close()
	require.ErrorIs(t, bad.op(), errWSMismatch)
}

// TestWSStream checks the WebSocket stream's byte count, a last message
// shorter than the others included, and its CPU figures.
func TestWSStream(t *testing.T) {
	srv := httptest.NewServer(newHandler())
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	for _, n := range []int64{0, 1, 3<<20 + 5} {
		r, err := runWSStream(addr, n, 64<<10, newCPUMeter(os.Getpid()))
		require.NoError(t, err, "%d bytes", n)
		assert.Equal(t, n, r.Bytes)
		assert.Positive(t, r.Seconds)
		require.NotNil(t, r.CPU, r.CPUError)
	}
	short := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.URL.RawQuery = "bytes=1000"
		serveWSStream(w, r)
	}))
	defer short.Close()
	_, err := runWSStream(strings.TrimPrefix(short.URL, "http://"), 2000, 64<<10, nil)
	require.ErrorContains(t, err, "1000 bytes of 2000")
}

// TestProcessTree checks that the RSS sampler finds a child.
func TestProcessTree(t *testing.T) {
	pipe, err := startPipe()
	require.NoError(t, err)
	defer pipe.Close()
	require.Contains(t, processTree(os.Getpid()), pipe.ChildPid())
	kb, ok := statusKB(os.Getpid(), "VmRSS:")
	require.True(t, ok)
	require.Positive(t, kb)
}

// TestMedianRange checks the median of odd and even counts.
func TestMedianRange(t *testing.T) {
	for _, tc := range []struct {
		xs          []float64
		med, lo, hi float64
	}{
		{nil, 0, 0, 0}, {[]float64{2}, 2, 2, 2}, {[]float64{3, 1, 2}, 2, 1, 3}, {[]float64{4, 1, 3, 2}, 2.5, 1, 4},
	} {
		med, lo, hi := medianRange(tc.xs)
		assert.Equal(t, []float64{tc.med, tc.lo, tc.hi}, []float64{med, lo, hi}, "%v", tc.xs)
	}
}

// sampleResults is a made-up run of three rounds with every kind of
// cell: figures with ratios and ranges, n/a, a workload that failed in
// every round, and one that failed in one round.
func sampleResults() *Results {
	load := func(rps, p50, p99 float64, cpu *CPUUse) *LoadResult {
		return &LoadResult{Clients: 1, Seconds: 5, Requests: int64(rps * 5), ReqPerSec: rps, MBPerSec: rps * 65536 / 1e6, P50us: p50, P99us: p99, MaxUs: p99 * 2, CPU: cpu}
	}
	// Per round, inproc and uds scale together (the machine's load) except
	// for uds's /small with 1 client, whose ratio is 0.25, 0.20, 0.30.
	round := func(i int, scale, udsSmall1 float64) Round {
		// inproc: 5 µs (parent) and 2.5 µs (loadgen) per request in every
		// round; uds: 20, 25 and 16.7 µs (parent) per request.
		inCPU := &CPUUse{ParentSec: 0.5 * scale, LoadgenSec: 0.25 * scale}
		udsCPU := &CPUUse{ParentSec: 0.5 * scale, ChildSec: 0.25, LoadgenSec: 0.125, Children: 1}
		rd := Round{Round: i, Peers: []PeerResult{
			{Name: "inproc", Small1: load(20000*scale, 50, 150, inCPU), Small64: load(70000*scale, 800, 4000, nil), Echo: load(16000*scale, 900, 3000, nil),
				Stream:  &StreamResult{Bytes: 1e9, MBPerSec: 2000 * scale, CPU: &CPUUse{ParentSec: 1}},
				WSEcho1: load(10000*scale, 90, 200, nil), WSEcho64: load(40000*scale, 1500, 6000, nil), WSStream: &StreamResult{Bytes: 1e9, MBPerSec: 1000 * scale},
				RSS: &RSSResult{PeakMiB: 20, HWMMiB: 21}, NotApplicable: notApplicable["inproc"]},
			{Name: "uds", Small1: load(20000*scale*udsSmall1, 200, 500, udsCPU), Small64: load(12000*scale, 5000, 14000, nil), Echo: load(4000*scale, 4000, 9000, nil),
				Stream:  &StreamResult{Bytes: 1e9, MBPerSec: 800 * scale, CPU: &CPUUse{ParentSec: 1.5, ChildSec: 0.5, Children: 1}},
				WSEcho1: load(3000*scale, 300, 900, nil), WSEcho64: load(20000*scale, 3000, 9000, nil), WSStream: &StreamResult{Bytes: 1e9, MBPerSec: 500 * scale},
				Restart: &RestartResult{Kills: 3, SamplesMs: []float64{9, 10, 11}, MedianMs: 10 + float64(i), MinMs: 9, MaxMs: 11},
				RSS:     &RSSResult{PeakMiB: 50, HWMMiB: 51}},
			{Name: "goplugin", Small1: load(4000*scale, 250, 600, nil), NotApplicable: notApplicable["goplugin"], Errors: []string{"stream: boom"}},
			{Name: "pipe", Stream: &StreamResult{Bytes: 1e9, MBPerSec: 1500 * scale}, NotApplicable: notApplicable["pipe"]},
			{Name: "subproc", Small1: load(10000*scale, 100, 300, nil), WSEcho64: load(30000*scale, 2000, 7000, nil), WSStream: &StreamResult{Bytes: 1e9, MBPerSec: 550 * scale}},
		}}
		if i == 3 {
			// uds's /small with 1 client was timed three times, the kept
			// timing losing 7.5 % of the machine.
			stolen := *udsCPU
			stolen.StealPct = 7.5
			rd.Peers[1].Small1.CPU, rd.Peers[1].Small1.Timings = &stolen, 3
		}
		if i == 2 {
			rd.Peers[1].Echo = nil // failed in round 2
			rd.Peers[1].Errors = []string{"echo: boom"}
		}
		return rd
	}
	r := &Results{
		Machine: Machine{Date: "2026-01-02T03:04:05Z", GoVersion: "go1.26", CPUModel: "Test <CPU> & co", NumCPU: 2, GOMAXPROCS: 2},
		Config:  Config{Rounds: 3, MaxSteal: 5, Warmup: time.Second, Duration: 5 * time.Second, EchoBytes: 64 << 10, EchoClients: 16, StreamBytes: 1 << 30, StreamChunk: 64 << 10, Kills: 3, WSEchoBytes: 64},
		Rounds:  []Round{round(1, 1, 0.25), round(2, 0.5, 0.2), round(3, 1.5, 0.3)},
	}
	r.summarize()
	return r
}

// TestSummarize checks the medians over the rounds and the per-round
// ratios' medians and ranges.
func TestSummarize(t *testing.T) {
	r := sampleResults()
	s := r.Summary["uds"]["small1_rps"]
	assert.Equal(t, []float64{5000, 2000, 9000}, s.Values)
	assert.Equal(t, []int{1, 2, 3}, s.Rounds)
	assert.Equal(t, 5000.0, s.Median)
	assert.InDeltaSlice(t, []float64{0.25, 0.2, 0.3}, s.Ratios, 1e-9)
	assert.InDelta(t, 0.25, s.Ratio, 1e-9)
	assert.InDelta(t, 0.2, s.RatioMin, 1e-9)
	assert.InDelta(t, 0.3, s.RatioMax, 1e-9)

	echo := r.Summary["uds"]["echo_rps"]
	assert.Equal(t, []int{1, 3}, echo.Rounds, "round 2's echo failed")
	assert.Equal(t, 5000.0, echo.Median, "rounds 1 and 3: the mean of the middle two")

	restart := r.Summary["uds"]["restart_ms"]
	assert.Equal(t, 12.0, restart.Median, "the median of the rounds' medians 11, 12, 13")
	assert.Empty(t, restart.Ratios, "restart times have no ratio")

	// CPU per request: parent 0.5×scale s over 20000×scale×0.25×5 requests.
	assert.InDelta(t, 20, r.Summary["uds"]["small1_cpu_parent"].Median, 1e-6)
	_, ok := r.Summary["inproc"]["small1_cpu_child"]
	assert.False(t, ok, "inproc has no child")
	// Stream CPU per GB, in ms: uds 1.5 + 0.5 s over 1 GB.
	assert.InDelta(t, 2000, r.Summary["uds"]["stream_cpu"].Median, 1e-6)
	assert.InDelta(t, 2, r.Summary["uds"]["stream_cpu"].Ratio, 1e-6)
	assert.Empty(t, r.Summary["subproc"]["echo_rps"].Values)
}

// TestMarkdown checks the tables' medians, ratios with their ranges, the
// n/a and failed cells, the CPU table, the goals and the notes.
func TestMarkdown(t *testing.T) {
	md := sampleResults().Markdown()
	for _, want := range []string{
		"| Workload | Metric | inproc | uds | goplugin | pipe | subproc |",
		"| (a) GET /small, 1 client | req/s | 20,000 | 5,000 · 0.25× (0.20–0.30) | 4,000 · 0.20× (0.20–0.20) | n/a | 10,000 · 0.50× (0.50–0.50) |",
		"| (c) GET /stream, one response | MB/s | 2,000 | 800 · 0.40× (0.40–0.40) | n/a | 1,500 · 0.75× (0.75–0.75) | failed |",
		"|  | server CPU, ms/GB (parent + child) | 1,000 | 2,000 · 2.00× (2.00–2.00) | n/a | failed | failed |",
		"| (b) POST /echo 64 KiB, 16 clients | req/s | 16,000 | 5,000 [2 of 3 rounds] · 0.25× (0.25–0.25) | failed | n/a | failed |",
		"| (d) SIGKILL child → next 200 | median ms | n/a | 12.0 | failed | n/a | failed |",
		"| (f) WebSocket echo 64 B, 64 connections | messages/s | 40,000 | 20,000 · 0.50× (0.50–0.50) | n/a | n/a | 30,000 · 0.75× (0.75–0.75) |",
		"| (a) GET /small, 1 client | µs/request | parent 5, loadgen 3 | parent 20, child 10, loadgen 5 | failed | n/a | failed |",
		"(a) GET /small, 1 client: p50 latency added to inproc's ≤ 60 µs: subproc 100, inproc 50; subproc − inproc +50 (+50 to +50): **met** (in 3 of 3 rounds)",
		"(f) WebSocket echo, 64 connections: messages/s ≥ uds's: subproc 30,000, uds 20,000; subproc ÷ uds 1.50× (1.50–1.50): **met** (in 3 of 3 rounds)",
		"(g) WebSocket stream: MB/s ≥ 0.6× inproc's: subproc 550, inproc 1,000; subproc ÷ inproc 0.55× (0.55–0.55): **not met** (in 0 of 3 rounds)",
		"uds: restart times in ms, round 1: 9.0, 10.0, 11.0; round 2: 9.0, 10.0, 11.0; round 3: 9.0, 10.0, 11.0",
		"round 2: uds: error: echo: boom",
		"round 3: at most 7.5 % of the machine's CPU time during a timed load was stolen by the hypervisor (uds, (a) GET /small, 1 client); timed again for more than 5 % stolen, the least disturbed timing kept: uds, (a) GET /small, 1 client: 3 timings",
		"goplugin: ws is n/a: ",
		"Rounds: 3, the peers interleaved (each round: inproc, uds, goplugin, pipe, subproc)",
		"GOMAXPROCS 2",
	} {
		assert.Contains(t, md, want)
	}
}

// TestRetime checks that a load during which the hypervisor stole more
// than -max-steal is timed again, at most -retimes more times, and that
// the least disturbed timing is kept.
func TestRetime(t *testing.T) {
	for _, tc := range []struct {
		name     string
		maxSteal float64
		retimes  int
		steals   []float64 // of each timing, in order (-1: not measured)
		n        int       // timings run
		kept     int       // index of the timing kept
	}{
		{"quiet", 5, 2, []float64{1}, 1, 0},
		{"disturbed then quiet", 5, 2, []float64{30, 4}, 2, 1},
		{"always disturbed: the least", 5, 2, []float64{30, 12, 25}, 3, 1},
		{"no retimes", 5, 0, []float64{30}, 1, 0},
		{"off", 0, 2, []float64{30}, 1, 0},
		{"not measured", 5, 2, []float64{-1}, 1, 0},
		{"exactly the bound", 5, 2, []float64{5}, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{MaxSteal: tc.maxSteal, Retimes: tc.retimes}
			var ran, notes int
			step := func(string, ...any) { notes++ }
			got, n, err := retime(cfg, step, func() (int, *CPUUse, error) {
				i := ran
				ran++
				require.Less(t, i, len(tc.steals), "timed once too often")
				if tc.steals[i] < 0 {
					return i, nil, nil
				}
				return i, &CPUUse{StealPct: tc.steals[i]}, nil
			})
			require.NoError(t, err)
			assert.Equal(t, tc.n, n, "timings")
			assert.Equal(t, tc.n, ran)
			assert.Equal(t, tc.kept, got, "timing kept")
			assert.Equal(t, tc.n-1, notes, "one line per timing taken again")
		})
	}

	boom := errors.New("boom")
	_, n, err := retime(Config{MaxSteal: 5, Retimes: 2}, func(string, ...any) {}, func() (int, *CPUUse, error) {
		return 0, &CPUUse{StealPct: 50}, boom
	})
	assert.ErrorIs(t, err, boom)
	assert.Equal(t, 1, n, "an error ends the timings")
}

// TestSVG checks that the chart is well-formed XML with escaped text, a
// bar per figure and a whisker per range.
func TestSVG(t *testing.T) {
	svg := sampleResults().SVG()
	d := xml.NewDecoder(strings.NewReader(svg))
	rects, whiskers := 0, 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		require.NoError(t, err, "SVG is not well-formed XML:\n%s", svg)
		if se, ok := tok.(xml.StartElement); ok {
			switch se.Name.Local {
			case "rect":
				rects++
			case "path":
				whiskers++
			}
		}
	}
	// Background, 5 legend squares, and the bars. Throughput: small1 uds,
	// goplugin, subproc; small64 uds; echo uds; stream uds, pipe; WS echo 1
	// uds; WS echo 64 uds, subproc; WS stream uds, subproc: 12. Latency:
	// small1 p50, p99 × 3; small64 p50, p99 × uds; WS 1 p50, p99 × uds;
	// WS 64 p50, p99 × uds, subproc: 14. CPU: small1, stream × uds: 2.
	// Restart uds: 1. RSS inproc, uds: 2.
	assert.Equal(t, 1+5+12+14+2+1+2, rects)
	// Only uds's /small with 1 client varies over the rounds, in ratio
	// (throughput, CPU), and its restart time.
	assert.Equal(t, 3, whiskers)
	assert.Contains(t, svg, "Test &lt;CPU&gt; &amp; co", "the CPU model is escaped")
}

// TestNiceAxis checks the axis's ends and steps.
func TestNiceAxis(t *testing.T) {
	for _, tc := range []struct{ max, step, end float64 }{
		{1, 0.2, 1.2}, {0.79, 0.2, 0.8}, {5.33, 2, 6}, {12.2, 2.5, 12.5}, {52.5, 20, 60}, {0, 0.2, 1},
	} {
		step, end := niceAxis(tc.max)
		assert.Equal(t, []float64{tc.step, tc.end}, []float64{step, end}, "niceAxis(%v)", tc.max)
	}
}

// TestParseFlags checks the rounds' defaults and their flag.
func TestParseFlags(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		rounds int
	}{{nil, 3}, {[]string{"-quick"}, 1}, {[]string{"-rounds", "5"}, 5}, {[]string{"-quick", "-rounds", "2"}, 2}} {
		cfg, err := parseFlags(tc.args)
		require.NoError(t, err, "%q", tc.args)
		assert.Equal(t, tc.rounds, cfg.Rounds, "%q", tc.args)
	}
	_, err := parseFlags([]string{"-rounds", "-1"})
	assert.ErrorContains(t, err, "-rounds")

	cfg, err := parseFlags(nil)
	require.NoError(t, err)
	assert.Equal(t, 5.0, cfg.MaxSteal)
	assert.Equal(t, 2, cfg.Retimes)
	cfg, err = parseFlags([]string{"-quick"})
	require.NoError(t, err)
	assert.Equal(t, 0, cfg.Retimes, "a smoke test times each load once")
	cfg, err = parseFlags([]string{"-quick", "-retimes", "1", "-max-steal", "10"})
	require.NoError(t, err)
	assert.Equal(t, 1, cfg.Retimes)
	assert.Equal(t, 10.0, cfg.MaxSteal)
	_, err = parseFlags([]string{"-max-steal", "101"})
	assert.ErrorContains(t, err, "-max-steal")

	cfg, err = parseFlags([]string{"-workloads", "small, restart"})
	require.NoError(t, err)
	assert.Equal(t, []string{"small", "restart"}, cfg.Workloads)
	assert.True(t, cfg.measures("rss"), "rss is measured during small")
	assert.False(t, cfg.runs("echo"))
	_, err = parseFlags([]string{"-workloads", "small,nap"})
	assert.ErrorContains(t, err, `unknown workload "nap"`)
	_, err = parseFlags([]string{"-peers", "inproc,nope"})
	assert.ErrorContains(t, err, `unknown peer "nope"`)
	_, err = parseFlags([]string{"-peers", " , "})
	assert.ErrorContains(t, err, "no peers")
}

// TestMarkdownWorkloads checks that the report leaves out the rows of the
// workloads a run did not include, rather than calling them failed.
func TestMarkdownWorkloads(t *testing.T) {
	r := sampleResults()
	r.Config.Workloads = []string{"small"}
	md := r.Markdown()
	assert.Contains(t, md, "| (a) GET /small, 1 client | req/s |")
	assert.Contains(t, md, "| (e) peak RSS during (a), parent + child |")
	assert.NotContains(t, md, "(b) POST /echo")
	assert.NotContains(t, md, "(g) WebSocket stream")
}

// TestQuick runs every peer end to end, in two interleaved rounds, with
// tiny loads, and checks that each produces its figures, the WebSocket
// ones and the CPU ones included, and that results.json keeps both
// rounds' raw figures. It takes about half a minute; -short skips it.
func TestQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end; skipped with -short")
	}
	cfg, err := parseFlags([]string{"-quick", "-rounds", "2", "-out", t.TempDir(), "-warmup", "100ms", "-duration", "300ms", "-stream-bytes", "8388608", "-kills", "1"})
	require.NoError(t, err)
	var out bytes.Buffer
	require.NoError(t, drive(cfg, &out))
	md := out.String()
	for _, f := range []string{"results.md", "results.json", "results.svg"} {
		require.FileExists(t, filepath.Join(cfg.Out, f))
	}
	assert.NotContains(t, md, " failed |", "a workload failed")
	assert.NotContains(t, md, ": error: ", "a workload failed")
	assert.NotContains(t, md, "not measured", "a CPU figure is missing")
	for _, row := range []string{
		"| (a) GET /small, 1 client |", "| (c) GET /stream, one response |", "| (d) SIGKILL child → next 200 |",
		"| (f) WebSocket echo 64 B, 1 connection | messages/s |", "| (f) WebSocket echo 64 B, 64 connections | messages/s |",
		"| (g) WebSocket stream, 64 KiB messages | MB/s |", "server CPU, µs/message (parent + child)",
		"Rounds: 2",
	} {
		assert.Contains(t, md, row)
	}
	for _, g := range issueGoals {
		assert.Contains(t, md, "- "+g.text+": subproc ", "every goal is checked")
	}

	b, err := os.ReadFile(filepath.Join(cfg.Out, "results.json"))
	require.NoError(t, err)
	var res Results
	require.NoError(t, json.Unmarshal(b, &res))
	require.Len(t, res.Rounds, 2)
	for _, rd := range res.Rounds {
		require.Len(t, rd.Peers, len(allPeers), "round %d", rd.Round)
		for i, p := range rd.Peers {
			assert.Equal(t, allPeers[i], p.Name, "round %d: the peers in order", rd.Round)
		}
		for _, name := range []string{"inproc", "uds", "subproc"} {
			p := rd.peer(name)
			require.NotNil(t, p.WSEcho64, "round %d: %s", rd.Round, name)
			require.NotNil(t, p.WSStream, "round %d: %s", rd.Round, name)
			assert.Positive(t, p.WSEcho64.Requests, "round %d: %s", rd.Round, name)
			require.NotNil(t, p.WSEcho64.CPU, "round %d: %s", rd.Round, name)
			require.NotNil(t, p.Small1.CPU, "round %d: %s", rd.Round, name)
			assert.Positive(t, p.Small1.CPU.LoadgenSec, "round %d: %s", rd.Round, name)
			assert.Positive(t, p.Small1.CPU.ParentSec+p.Small1.CPU.ChildSec, "round %d: %s", rd.Round, name)
			if name != "inproc" {
				assert.Positive(t, p.Small1.CPU.Children, "round %d: %s", rd.Round, name)
			}
		}
	}
	assert.Len(t, res.Summary["subproc"]["wsecho64_rps"].Ratios, 2, "a ratio per round")

	// -from rewrites the same markdown from the JSON.
	var again bytes.Buffer
	require.NoError(t, replot(filepath.Join(cfg.Out, "results.json"), t.TempDir(), &again))
	assert.Equal(t, md, again.String())
}
