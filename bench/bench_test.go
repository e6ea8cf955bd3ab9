package main

import (
	"bytes"
	"encoding/xml"
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
		if err := smallOp(c); err != nil {
			t.Fatal(err)
		}
	}
	for _, size := range []int{0, 1, 100, 64 << 10, 1 << 20} {
		if err := echoOp(echoBody(size))(c); err != nil {
			t.Fatalf("echo of %d bytes: %v", size, err)
		}
	}
	for _, tc := range []struct {
		n     int64
		chunk int
	}{{0, 1}, {1, 1}, {100_000, 4096}, {3 << 20, 64 << 10}} {
		status, n, err := c.get(fmt.Sprintf("/stream?bytes=%d&chunk=%d", tc.n, tc.chunk))
		if err != nil || status != 200 || n != tc.n {
			t.Fatalf("stream %+v: status %d, %d bytes, %v", tc, status, n, err)
		}
	}
	if status, _, err := c.get("/nothing"); err != nil || status != 404 {
		t.Fatalf("GET /nothing: status %d, %v", status, err)
	}
	if err := smallOp(c); err != nil {
		t.Fatal("after a 404:", err)
	}
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
	if err := echoOp(echoBody(1000))(c); err != errMismatch {
		t.Fatalf("got %v, want errMismatch", err)
	}
}

// TestRunLoad checks the counting of a timed load.
func TestRunLoad(t *testing.T) {
	srv := httptest.NewServer(newHandler())
	defer srv.Close()
	r := runLoad(strings.TrimPrefix(srv.URL, "http://"), 4, 50*time.Millisecond, 200*time.Millisecond, 0, smallOp)
	if r.Requests == 0 || r.Errors != 0 || r.P50us <= 0 || r.P99us < r.P50us || r.MaxUs < r.P99us {
		t.Fatalf("implausible result %+v", r)
	}
}

// TestProcessTree checks that the RSS sampler finds a child.
func TestProcessTree(t *testing.T) {
	pipe, err := startPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pipe.Close()
	tree := processTree(os.Getpid())
	found := false
	for _, pid := range tree {
		found = found || pid == pipe.ChildPid()
	}
	if !found {
		t.Fatalf("child %d not in tree %v", pipe.ChildPid(), tree)
	}
	if kb, ok := statusKB(os.Getpid(), "VmRSS:"); !ok || kb <= 0 {
		t.Fatalf("VmRSS: %d, %v", kb, ok)
	}
}

// sampleResults is a made-up run with every kind of cell: figures, n/a,
// and a failed workload.
func sampleResults() *Results {
	load := func(rps, p50, p99 float64) *LoadResult {
		return &LoadResult{Clients: 1, Seconds: 5, Requests: int64(rps * 5), ReqPerSec: rps, MBPerSec: rps * 65536 / 1e6, P50us: p50, P99us: p99, MaxUs: p99 * 2}
	}
	return &Results{
		Machine: Machine{Date: "2026-01-02T03:04:05Z", GoVersion: "go1.26", CPUModel: "Test <CPU> & co", NumCPU: 2, GOMAXPROCS: 2},
		Config:  Config{Warmup: time.Second, Duration: 5 * time.Second, EchoBytes: 64 << 10, EchoClients: 16, StreamBytes: 1 << 30, StreamChunk: 64 << 10, Kills: 7},
		Peers: []PeerResult{
			{Name: "inproc", Small1: load(20000, 50, 150), Small64: load(70000, 800, 4000), Echo: load(16000, 900, 3000),
				Stream: &StreamResult{MBPerSec: 2000}, RSS: &RSSResult{PeakMiB: 20, HWMMiB: 21}, NotApplicable: notApplicable["inproc"]},
			{Name: "uds", Small1: load(5000, 200, 500), Small64: load(12000, 5000, 14000), Echo: load(4000, 4000, 9000),
				Stream: &StreamResult{MBPerSec: 800}, Restart: &RestartResult{Kills: 7, SamplesMs: []float64{9, 10, 11}, MedianMs: 10, MinMs: 9, MaxMs: 11},
				RSS: &RSSResult{PeakMiB: 50, HWMMiB: 51}},
			{Name: "goplugin", Small1: load(4000, 250, 600), NotApplicable: notApplicable["goplugin"], Errors: []string{"stream: boom"}},
			{Name: "pipe", Stream: &StreamResult{MBPerSec: 1500}, NotApplicable: notApplicable["pipe"]},
		},
	}
}

// TestMarkdown checks the table's ratios and its n/a and failed cells.
func TestMarkdown(t *testing.T) {
	md := sampleResults().Markdown()
	for _, want := range []string{
		"| Workload | Metric | inproc | uds | goplugin | pipe |",
		"| (a) GET /small, 1 client | req/s | 20,000 | 5,000 (0.25×) | 4,000 (0.20×) | n/a |",
		"| (c) GET /stream, one response | MB/s | 2,000 | 800 (0.40×) | n/a | 1,500 (0.75×) |",
		"| (d) SIGKILL child → next 200 | median ms | n/a | 10.0 | failed | n/a |",
		"| (a) GET /small, 64 clients | req/s | 70,000 | 12,000 (0.17×) | failed | n/a |",
		"goplugin: error: stream: boom",
		"GOMAXPROCS 2",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestSVG checks that the chart is well-formed XML with escaped text and
// a bar per figure.
func TestSVG(t *testing.T) {
	svg := sampleResults().SVG()
	d := xml.NewDecoder(strings.NewReader(svg))
	rects := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			rects++
		}
	}
	// Background, 4 legend squares, and the bars: throughput 2+1+1+2 (uds,
	// goplugin in small1; uds in small64 and echo; uds, pipe in stream),
	// latency 2+2+1+1, restart 1, RSS 2.
	if want := 1 + 4 + 6 + 6 + 1 + 2; rects != want {
		t.Errorf("%d rects, want %d", rects, want)
	}
	if !strings.Contains(svg, "Test &lt;CPU&gt; &amp; co") {
		t.Error("the CPU model is not escaped")
	}
}

// TestNiceAxis checks the axis's ends and steps.
func TestNiceAxis(t *testing.T) {
	for _, tc := range []struct{ max, step, end float64 }{
		{1, 0.2, 1.2}, {0.79, 0.2, 0.8}, {5.33, 2, 6}, {12.2, 2.5, 12.5}, {52.5, 20, 60}, {0, 0.2, 1},
	} {
		step, end := niceAxis(tc.max)
		if step != tc.step || end != tc.end {
			t.Errorf("niceAxis(%v) = %v, %v; want %v, %v", tc.max, step, end, tc.step, tc.end)
		}
	}
}

// TestQuick runs every peer end to end with tiny loads and checks that
// each produces its figures. It takes about ten seconds; -short skips it.
func TestQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end; skipped with -short")
	}
	cfg, err := parseFlags([]string{"-quick", "-out", t.TempDir(), "-warmup", "100ms", "-duration", "300ms", "-stream-bytes", "8388608", "-kills", "1"})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := drive(cfg, &out); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"results.md", "results.json", "results.svg"} {
		if _, err := os.Stat(filepath.Join(cfg.Out, f)); err != nil {
			t.Error(err)
		}
	}
	if strings.Contains(out.String(), " failed |") || strings.Contains(out.String(), ": error: ") {
		t.Errorf("a workload failed:\n%s", out.String())
	}
	for _, row := range []string{"| (a) GET /small, 1 client |", "| (c) GET /stream, one response |", "| (d) SIGKILL child → next 200 |"} {
		if !strings.Contains(out.String(), row) {
			t.Errorf("no row %q:\n%s", row, out.String())
		}
	}
}
