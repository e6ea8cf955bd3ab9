// Package browsertest drives the dashboard's page in a real browser:
// headless Chromium, through chromedp. It is a module of its own so that
// chromedp stays out of the library's go.mod; it skips when chromium is not
// installed. Run it with
//
//	cd examples/dashboard/browsertest && go test
//
// With DASHBOARD_SCREENSHOT=path, it then also presses "leak", "stuck" and
// the logs module's Restart, waits for their effects (a recycle for memory,
// ChildStuck, the log resumed) and saves a screenshot of the page there, as
// PNG.
package browsertest

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// waitFor bounds every wait of the test for the page to change.
const waitFor = 30 * time.Second

// startDashboard builds the dashboard and runs it on a free port until the
// test ends, and returns its URL.
func startDashboard(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "dashboard")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = ".." // examples/dashboard, in the library's module
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the dashboard: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0", "-logdir", filepath.Join(dir, "logs"))
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Ctrl-C's signal: the dashboard stops its children and exits.
		cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("the dashboard: %v", err)
			}
		case <-time.After(waitFor):
			cmd.Process.Kill()
			t.Errorf("the dashboard did not stop within %v of SIGINT", waitFor)
		}
	})
	urls := make(chan string, 1)
	go func() {
		serving := regexp.MustCompile(`serving on (\S+)`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := serving.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case urls <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case url := <-urls:
		return url
	case <-time.After(waitFor):
		t.Fatal("the dashboard did not say where it serves")
		return ""
	}
}

// TestCrashFromThePage loads the page, presses "crash (os.Exit)", and checks
// that the page shows the crashed child's ChildExited event, pushed, and a
// new child in the pool's table.
func TestCrashFromThePage(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed (apt-get install chromium): the browser test needs it")
	}
	url := startDashboard(t)

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser),
		chromedp.NoSandbox,
		chromedp.WindowSize(1400, 1800),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*waitFor)
	defer cancelTimeout()

	// The chaos card's table lists three running children.
	// (none before the first state has drawn the card)
	const pids = `(Array.from(document.querySelectorAll(".module")).find(d => d.querySelector("h3").textContent.startsWith("chaos"))` +
		`?.querySelectorAll("tbody tr td:nth-child(2)") ?? [])`
	var before []string
	if err := chromedp.Run(ctx,
		chromedp.Navigate(url),
		chromedp.Poll(pids+`.length === 3`, nil, chromedp.WithPollingTimeout(waitFor)),
		chromedp.Evaluate(`Array.from(`+pids+`).map(td => td.textContent)`, &before),
	); err != nil {
		t.Fatalf("loading the page: %v", err)
	}

	// Crash one child from its button.
	var result string
	if err := chromedp.Run(ctx,
		chromedp.Click(`button[data-path="/api/chaos/crash"]`, chromedp.ByQuery),
		chromedp.Poll(`document.getElementById("result").textContent.includes("502")`, nil, chromedp.WithPollingTimeout(waitFor)),
		chromedp.Text("#result", &result, chromedp.ByID),
	); err != nil {
		t.Fatalf("pressing crash: %v", err)
	}
	t.Logf("the crash's answer: %s", result)

	// The event shows, pushed, and a new child takes the crashed one's
	// place.
	beforeJS := `["` + strings.Join(before, `","`) + `"]`
	var exit string
	var after []string
	if err := chromedp.Run(ctx,
		chromedp.Poll(`Array.from(document.querySelectorAll("#event-rows tr")).some(tr => tr.textContent.includes("ChildExited") && tr.textContent.includes("crash"))`,
			nil, chromedp.WithPollingTimeout(waitFor)),
		chromedp.Evaluate(`Array.from(document.querySelectorAll("#event-rows tr")).find(tr => tr.textContent.includes("ChildExited")).textContent`, &exit),
		chromedp.Poll(`(() => { const p = Array.from(`+pids+`).map(td => td.textContent);`+
			` return p.length === 3 && p.filter(x => !`+beforeJS+`.includes(x)).length === 1 &&`+
			` Array.from(document.querySelectorAll(".module tbody tr")).every(tr => !tr.textContent.includes("starting")); })()`,
			nil, chromedp.WithPollingTimeout(waitFor)),
		chromedp.Evaluate(`Array.from(`+pids+`).map(td => td.textContent)`, &after),
	); err != nil {
		t.Fatalf("waiting for the page to show the crash and the new child (pids before %v): %v", before, err)
	}
	t.Logf("the pool went from %v to %v; the event: %s", before, after, exit)

	if path := os.Getenv("DASHBOARD_SCREENSHOT"); path != "" {
		var png []byte
		hasEvent := func(kind, reason string) chromedp.Action {
			return chromedp.Poll(`Array.from(document.querySelectorAll("#event-rows tr")).some(tr => tr.textContent.includes("`+kind+`") && tr.textContent.includes("`+reason+`"))`,
				nil, chromedp.WithPollingTimeout(waitFor))
		}
		if err := chromedp.Run(ctx,
			chromedp.Click("#leak", chromedp.ByID),
			hasEvent("ChildRecycling", "memory"),
			chromedp.Click("#stuck", chromedp.ByID),
			hasEvent("ChildStuck", "stuck"),
			chromedp.Click(`.module button`, chromedp.ByQuery), // the logs module's Restart
			chromedp.Poll(`document.getElementById("log").textContent.includes("resumed from byte")`, nil, chromedp.WithPollingTimeout(waitFor)),
			chromedp.Sleep(3*time.Second), // for the charts' next second
		); err != nil {
			t.Fatalf("pressing leak, stuck and Restart for the screenshot: %v", err)
		}
		if err := chromedp.Run(ctx, chromedp.FullScreenshot(&png, 100)); err != nil {
			t.Fatalf("screenshot: %v", err)
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot in %s", path)
	}
}
