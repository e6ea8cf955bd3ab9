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
	"slices"
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

// lookChromium returns the path of Debian's chromium, or skips the test.
func lookChromium(t *testing.T) string {
	t.Helper()
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed (apt-get install chromium): the browser test needs it")
	}
	return browser
}

// newBrowser starts headless chromium at path, and returns a context for
// chromedp's actions in a tab of it, ended when the test ends and bounded
// by 3×waitFor.
func newBrowser(t *testing.T, path string) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox,
		chromedp.WindowSize(1400, 1800),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*waitFor)
	t.Cleanup(cancelTimeout)
	return ctx
}

// TestCrashFromThePage loads the page, presses "crash (os.Exit)", and checks
// that the page shows the crashed child's ChildExited event, pushed, and a
// new child in the pool's table.
func TestCrashFromThePage(t *testing.T) {
	browser := lookChromium(t)
	url := startDashboard(t)
	ctx := newBrowser(t, browser)

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

// logLinesJS is the live log's lines of the file, as {offset, next, text}.
const logLinesJS = `Array.from(document.querySelectorAll("#log span.line")).map(s => ({offset: +s.dataset.offset, next: +s.dataset.next, text: s.textContent.trimEnd()}))`

// A logLine is one line of the page's live log.
type logLine struct {
	Offset, Next int64
	Text         string
}

// TestLiveLogFromThePage follows the page's live log, which comes down the
// logs module's WebSocket: the socket's indicator says live, a mark typed
// into the input comes back in the tail, and after the logs module's
// Restart button the indicator goes to reconnecting and back to live, with
// the new child's pid, and the tail resumes: the new child's lines after
// the old child's, each line once, each starting where the one before it
// ended.
func TestLiveLogFromThePage(t *testing.T) {
	browser := lookChromium(t)
	url := startDashboard(t)
	ctx := newBrowser(t, browser)
	poll := func(js string) chromedp.Action {
		return chromedp.Poll(js, nil, chromedp.WithPollingTimeout(waitFor))
	}

	// The socket goes live, and lines come down it with their offsets.
	// Every change of the indicator is recorded from now on.
	var state string
	if err := chromedp.Run(ctx,
		chromedp.Navigate(url),
		poll(`document.getElementById("log-state").dataset.state === "live"`),
		chromedp.Evaluate(`window.logStates = [];
			new MutationObserver(() => logStates.push(document.getElementById("log-state").dataset.state))
				.observe(document.getElementById("log-state"), {attributes: true, attributeFilter: ["data-state"]});`, nil),
		poll(`document.querySelectorAll("#log span.line").length >= 3`),
		chromedp.Text("#log-state", &state, chromedp.ByID),
	); err != nil {
		t.Fatalf("loading the page and its live log: %v", err)
	}
	pid := regexp.MustCompile(`pid (\d+)`).FindStringSubmatch(state)
	if pid == nil {
		t.Fatalf("the socket's indicator %q does not name the logs child's pid", state)
	}
	t.Logf("the socket's indicator: %s", state)

	// A mark typed into the input goes up the socket, and comes back down
	// as a line the old child appended.
	const mark = "typed in chromium"
	if err := chromedp.Run(ctx,
		chromedp.SendKeys("#mark", mark, chromedp.ByID),
		chromedp.Click("#mark-send", chromedp.ByID),
		poll(`Array.from(document.querySelectorAll("#log span.line.mark")).some(s => s.textContent.includes("pid=`+pid[1]+` ") && s.textContent.trimEnd().endsWith(" mark: `+mark+`"))`),
	); err != nil {
		t.Fatalf("sending a mark from the page: %v", err)
	}

	// The logs module's Restart button (the first card's): the socket
	// closes with 1001, the page reconnects from its last offset, and the
	// new child serves it.
	var after string
	var states []string
	if err := chromedp.Run(ctx,
		chromedp.Click(`.module button`, chromedp.ByQuery),
		poll(`(() => { const s = document.getElementById("log-state");
			return s.dataset.state === "live" && !s.textContent.includes("pid `+pid[1]+`,"); })()`),
		poll(`document.getElementById("log").textContent.includes("resumed from byte")`),
		chromedp.Text("#log-state", &after, chromedp.ByID),
		chromedp.Evaluate(`logStates`, &states),
	); err != nil {
		t.Fatalf("restarting the logs module from the page: %v", err)
	}
	t.Logf("after the restart the indicator went %v, and says: %s", states, after)
	newPid := regexp.MustCompile(`pid (\d+)`).FindStringSubmatch(after)
	if newPid == nil {
		t.Fatalf("the socket's indicator %q does not name the logs child's pid", after)
	}
	if i := slices.Index(states, "reconnecting"); i < 0 || !slices.Contains(states[i:], "live") {
		t.Errorf("the socket's indicator went %v at the restart, want reconnecting, then live", states)
	}
	var notes string
	if err := chromedp.Run(ctx, chromedp.Evaluate(`Array.from(document.querySelectorAll("#log span.note")).map(s => s.textContent).join("")`, &notes)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(notes, "socket closed (1001 ") {
		t.Errorf("the page's notes %q do not say the socket closed with 1001 (going away)", notes)
	}
	if strings.Contains(notes, "[gap:") {
		t.Errorf("the page saw a gap: %q", notes)
	}

	// The tail resumes with the new child's lines, after the old one's:
	// each line once, each where the one before it ended.
	var lines []logLine
	if err := chromedp.Run(ctx,
		poll(`Array.from(document.querySelectorAll("#log span.line")).filter(s => s.textContent.includes("pid=`+newPid[1]+` ")).length >= 2`),
		chromedp.Evaluate(logLinesJS, &lines),
	); err != nil {
		t.Fatalf("waiting for the new child's lines in the page: %v", err)
	}
	seen := make(map[string]bool)
	for i, l := range lines {
		if i > 0 && l.Offset != lines[i-1].Next {
			t.Errorf("line %d %q starts at byte %d; the one before it, %q, ended at %d", i, l.Text, l.Offset, lines[i-1].Text, lines[i-1].Next)
		}
		if seen[l.Text] {
			t.Errorf("line %d %q shown twice", i, l.Text)
		}
		seen[l.Text] = true
	}
	first, last := lines[0].Text, lines[len(lines)-1].Text
	if !strings.Contains(first, "pid="+pid[1]+" ") || !strings.Contains(last, "pid="+newPid[1]+" ") {
		t.Errorf("the log runs from %q to %q, want from the old child's (pid %s) lines to the new one's (pid %s)", first, last, pid[1], newPid[1])
	}
	t.Logf("%d lines, bytes %d to %d, from pid %s to pid %s", len(lines), lines[0].Offset, lines[len(lines)-1].Next, pid[1], newPid[1])
}
