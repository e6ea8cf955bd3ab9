package wstest

// TestBrowser drives WebSockets from headless Chromium (Debian's chromium
// package), through chromedp, to gorilla/websocket and coder/websocket
// servers in a module. It skips where chromium is not installed.

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/coder/websocket"
	"github.com/fbbf71ac/subproc"
	"github.com/fbbf71ac/subproc/subproctest"
	gorilla "github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// browserPage is the page the modules serve at /: its JavaScript runs the
// scenarios TestBrowser starts.
//
//go:embed testdata/browser.html
var browserPage []byte

// browserWait bounds each wait of TestBrowser for the browser, generously:
// the machine may be loaded.
const browserWait = 2 * time.Minute

// Both browser modules serve the same paths:
//
//	/                 browserPage
//	/echo?session=ID  pushes "push <library> <token>" unprompted, expects
//	                  "ack <token>", then echoes every message, with its
//	                  type, until the browser closes
//	/bye?session=ID   sends "bye soon", then closes with 1001 "server says bye"
//	/report?session=ID  once session ID has ended, what the module saw of
//	                  it (a serverReport, as JSON)
func init() {
	subproc.Register("ws-browser-gorilla", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return browserMux("gorilla", gorillaBrowserEcho, gorillaBrowserBye), nil
	})
	subproc.Register("ws-browser-coder", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return browserMux("coder", coderBrowserEcho, coderBrowserBye), nil
	})
}

// A serverReport is what a browser module saw of one session.
type serverReport struct {
	Library string `json:"library"` // the module's library: "gorilla" or "coder"
	Acked   bool   `json:"acked"`   // the browser answered the push with its token
	// Messages and Bytes count the messages echoed and their payloads.
	Messages int   `json:"messages"`
	Bytes    int64 `json:"bytes"`
	// CloseCode and CloseReason are those of the browser's close frame;
	// CloseCode is 0 if none came, or where the library does not tell it
	// (coder/websocket's Close, at /bye).
	CloseCode   int    `json:"closeCode"`
	CloseReason string `json:"closeReason"`
	Handshake   bool   `json:"handshake"` // at /bye: the browser answered the module's close frame
	Err         string `json:"err"`       // what else went wrong, if anything
}

// sessions holds the reports of a browser module's sessions, by ID.
type sessions struct {
	mu sync.Mutex // guards m
	m  map[string]*session
}

// A session is one WebSocket of a browser module, or one that /report
// waits for.
type session struct {
	started bool          // a WebSocket handler took it; guarded by sessions.mu
	done    chan struct{} // closed by the handler when it ends
	rep     serverReport  // written by the handler before done is closed
}

// get returns session id, which it creates if need be.
func (s *sessions) get(id string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[string]*session)
	}
	se := s.m[id]
	if se == nil {
		se = &session{done: make(chan struct{})}
		s.m[id] = se
	}
	return se
}

// take returns session id for its WebSocket handler, or nil if another
// handler already took it.
func (s *sessions) take(id string) *session {
	se := s.get(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if se.started {
		return nil
	}
	se.started = true
	return se
}

// browserMux returns a browser module's handler: lib names its library,
// echo and bye serve /echo and /bye, writing what they see into rep.
func browserMux(lib string, echo, bye func(w http.ResponseWriter, r *http.Request, rep *serverReport)) http.Handler {
	var s sessions
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(browserPage)
	})
	serve := func(h func(w http.ResponseWriter, r *http.Request, rep *serverReport)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			id := r.URL.Query().Get("session")
			se := s.take(id)
			if se == nil {
				http.Error(w, fmt.Sprintf("session %q was already used: give each WebSocket a session of its own", id), http.StatusConflict)
				return
			}
			defer close(se.done)
			se.rep.Library = lib
			h(w, r, &se.rep)
		}
	}
	mux.HandleFunc("GET /echo", serve(echo))
	mux.HandleFunc("GET /bye", serve(bye))
	mux.HandleFunc("GET /report", func(w http.ResponseWriter, r *http.Request) {
		se := s.get(r.URL.Query().Get("session"))
		select {
		case <-se.done:
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(se.rep)
		case <-r.Context().Done():
		}
	})
	return mux
}

// gorillaBrowserEcho serves /echo with gorilla/websocket.
func gorillaBrowserEcho(w http.ResponseWriter, r *http.Request, rep *serverReport) {
	up := gorilla.Upgrader{ReadBufferSize: 64 << 10, WriteBufferSize: 64 << 10}
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		rep.Err = "upgrade: " + err.Error()
		return
	}
	defer c.Close()
	c.SetReadLimit(2 << 20)
	// gorilla's own close handler answers with the code alone; this one
	// echoes the reason too, as coder/websocket does, so that the
	// browser's onclose sees both.
	c.SetCloseHandler(func(code int, text string) error {
		rep.CloseCode, rep.CloseReason = code, text
		c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(code, text), time.Now().Add(10*time.Second))
		return nil
	})
	token := rand.Text()
	if err := c.WriteMessage(gorilla.TextMessage, []byte("push gorilla "+token)); err != nil {
		rep.Err = "push: " + err.Error()
		return
	}
	typ, p, err := c.ReadMessage()
	if err != nil {
		rep.Err = "reading the answer to the push: " + err.Error()
		return
	}
	if typ != gorilla.TextMessage || string(p) != "ack "+token {
		rep.Err = fmt.Sprintf("the answer to the push: %q (type %d), want %q", p, typ, "ack "+token)
		c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(4001, "bad ack"), time.Now().Add(10*time.Second))
		return
	}
	rep.Acked = true
	for {
		typ, p, err := c.ReadMessage()
		if err != nil {
			if !errors.As(err, new(*gorilla.CloseError)) {
				rep.Err = "read: " + err.Error()
			}
			return
		}
		if err := c.WriteMessage(typ, p); err != nil {
			rep.Err = fmt.Sprintf("echo %d: %v", rep.Messages, err)
			return
		}
		rep.Messages++
		rep.Bytes += int64(len(p))
	}
}

// gorillaBrowserBye serves /bye with gorilla/websocket.
func gorillaBrowserBye(w http.ResponseWriter, r *http.Request, rep *serverReport) {
	up := gorilla.Upgrader{}
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		rep.Err = "upgrade: " + err.Error()
		return
	}
	defer c.Close()
	if err := c.WriteMessage(gorilla.TextMessage, []byte("bye soon")); err != nil {
		rep.Err = "write: " + err.Error()
		return
	}
	if err := c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(gorilla.CloseGoingAway, "server says bye"), time.Now().Add(10*time.Second)); err != nil {
		rep.Err = "close: " + err.Error()
		return
	}
	c.SetReadDeadline(time.Now().Add(browserWait))
	for { // until the browser's close frame comes back
		_, _, err := c.ReadMessage()
		if err == nil {
			continue
		}
		var ce *gorilla.CloseError
		if errors.As(err, &ce) {
			rep.CloseCode, rep.CloseReason = ce.Code, ce.Text
			rep.Handshake = true
		} else {
			rep.Err = "waiting for the browser's close frame: " + err.Error()
		}
		return
	}
}

// coderBrowserEcho serves /echo with coder/websocket.
func coderBrowserEcho(w http.ResponseWriter, r *http.Request, rep *serverReport) {
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		rep.Err = "accept: " + err.Error()
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(2 << 20)
	ctx := r.Context()
	token := rand.Text()
	if err := c.Write(ctx, websocket.MessageText, []byte("push coder "+token)); err != nil {
		rep.Err = "push: " + err.Error()
		return
	}
	typ, p, err := c.Read(ctx)
	if err != nil {
		rep.Err = "reading the answer to the push: " + err.Error()
		return
	}
	if typ != websocket.MessageText || string(p) != "ack "+token {
		rep.Err = fmt.Sprintf("the answer to the push: %q (%v), want %q", p, typ, "ack "+token)
		c.Close(4001, "bad ack")
		return
	}
	rep.Acked = true
	for {
		typ, p, err := c.Read(ctx)
		if err != nil {
			// coder/websocket has answered a close frame, with its code
			// and reason, before Read returns it.
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				rep.CloseCode, rep.CloseReason = int(ce.Code), ce.Reason
			} else {
				rep.Err = "read: " + err.Error()
			}
			return
		}
		if err := c.Write(ctx, typ, p); err != nil {
			rep.Err = fmt.Sprintf("echo %d: %v", rep.Messages, err)
			return
		}
		rep.Messages++
		rep.Bytes += int64(len(p))
	}
}

// coderBrowserBye serves /bye with coder/websocket.
func coderBrowserBye(w http.ResponseWriter, r *http.Request, rep *serverReport) {
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		rep.Err = "accept: " + err.Error()
		return
	}
	defer c.CloseNow()
	if err := c.Write(r.Context(), websocket.MessageText, []byte("bye soon")); err != nil {
		rep.Err = "write: " + err.Error()
		return
	}
	// Close returns once the browser's close frame has come back.
	if err := c.Close(websocket.StatusGoingAway, "server says bye"); err != nil {
		rep.Err = "close handshake: " + err.Error()
		return
	}
	rep.Handshake = true
}

// A closeEvent is a browser's CloseEvent, as the page records it.
type closeEvent struct {
	Code     int     `json:"code"`
	Reason   string  `json:"reason"`
	WasClean bool    `json:"wasClean"`
	At       float64 `json:"at"` // performance.now(), in milliseconds
}

// status returns e without its time, to compare.
func (e closeEvent) status() closeEvent {
	e.At = 0
	return e
}

// TestBrowser loads a module's page in headless Chromium, whose JavaScript
// then, over WebSockets to the module through the Handle:
//   - answers the module's unprompted push, echoes 300 random messages of
//     1 B to 1 MiB, text and binary, each checked byte for byte, and closes
//     with 4000: the module reports that code and reason, and the browser
//     sees it echoed in a clean close;
//   - sees the module close with 1001, cleanly, and answers it;
//   - holds a socket open while the child is killed: onclose fires with
//     1006, unclean, and a new socket reaches the replacement child.
func TestBrowser(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed (apt-get install chromium): TestBrowser drives its WebSockets from headless Chromium")
	}
	for _, lib := range []string{"gorilla", "coder"} {
		module := "ws-browser-" + lib
		t.Run(module, func(t *testing.T) {
			h, wsURL := start(t, module)
			base := "http" + strings.TrimPrefix(wsURL, "ws")
			ctx := newBrowser(t, browser)
			run(t, ctx, "loading the page", chromedp.Navigate(base+"/"),
				chromedp.Poll(`typeof start === "function"`, nil, pollEvery, chromedp.WithPollingTimeout(browserWait)))

			t.Run("echo", func(t *testing.T) {
				const count = 300
				var got struct {
					Push     string     `json:"push"`
					Messages int        `json:"messages"`
					Bytes    int64      `json:"bytes"`
					MS       float64    `json:"ms"`
					Close    closeEvent `json:"close"`
				}
				scenario(t, ctx, "echo", fmt.Sprintf(`echo, "echo", %d`, count), &got)
				t.Logf("%d messages, %.1f MiB echoed and checked in the browser in %.0f ms; close %+v",
					got.Messages, float64(got.Bytes)/(1<<20), got.MS, got.Close)
				assert.True(t, strings.HasPrefix(got.Push, "push "+lib+" "), "the module's push %q, want it from %s", got.Push, lib)
				assert.Equal(t, closeEvent{Code: 4000, Reason: "browser says bye", WasClean: true}, got.Close.status(), "the browser's onclose")
				assert.Equal(t, serverReport{
					Library: lib, Acked: true, Messages: count, Bytes: got.Bytes,
					CloseCode: 4000, CloseReason: "browser says bye",
				}, report(t, base, "echo"), "the module's report on the session")
			})

			t.Run("close from the server", func(t *testing.T) {
				var got struct {
					Messages []string   `json:"messages"`
					Close    closeEvent `json:"close"`
				}
				scenario(t, ctx, "bye", `serverClose, "bye"`, &got)
				assert.Equal(t, []string{"bye soon"}, got.Messages, "what the browser received before the close")
				assert.Equal(t, closeEvent{Code: 1001, Reason: "server says bye", WasClean: true}, got.Close.status(), "the browser's onclose")
				rep := report(t, base, "bye")
				t.Logf("the module's report: %+v", rep)
				assert.True(t, rep.Handshake, "the browser answered the module's close frame")
				assert.Empty(t, rep.Err, "the module's error")
			})

			t.Run("child killed", func(t *testing.T) {
				run(t, ctx, "opening the socket to hold",
					chromedp.Evaluate(`start("held", held, "held")`, nil),
					chromedp.Poll(`progress.held === "open" || results.held !== null`, nil, pollEvery, chromedp.WithPollingTimeout(browserWait)))
				failed(t, ctx, "held")
				children := h.Stats().Children
				require.Len(t, children, 1, "the module's children")
				pid := children[0].Pid
				run(t, ctx, "marking the kill", chromedp.Evaluate(`killAt = performance.now()`, nil))
				subproctest.Kill(t, h)
				var got struct {
					Close     closeEvent `json:"close"`
					AfterKill float64    `json:"afterKill"`
				}
				scenario(t, ctx, "held", "", &got)
				t.Logf("the browser's onclose fired %.0f ms after the SIGKILL of pid %d: %+v", got.AfterKill, pid, got.Close)
				assert.Equal(t, closeEvent{Code: 1006}, got.Close.status(), "the browser's onclose after the child's death")

				// The page goes on with the replacement child.
				var again struct {
					Messages int        `json:"messages"`
					Bytes    int64      `json:"bytes"`
					Close    closeEvent `json:"close"`
				}
				scenario(t, ctx, "again", `echo, "again", 21`, &again)
				assert.Equal(t, closeEvent{Code: 4000, Reason: "browser says bye", WasClean: true}, again.Close.status(), "the browser's onclose")
				assert.Equal(t, serverReport{
					Library: lib, Acked: true, Messages: 21, Bytes: again.Bytes,
					CloseCode: 4000, CloseReason: "browser says bye",
				}, report(t, base, "again"), "the replacement child's report")
			})
		})
	}
}

// pollEvery polls on a timer rather than at animation frames, which a
// headless page need not draw.
var pollEvery = chromedp.WithPollingInterval(50 * time.Millisecond)

// newBrowser starts a headless Chromium at path for the test, closed when it
// ends, and returns its context.
func newBrowser(t *testing.T, path string) context.Context {
	t.Helper()
	// Without the sandbox: as root (CI, containers) Chromium refuses to
	// start with it, and the page is the test's own.
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	// The first Run starts the browser, which a deadline on its context
	// would stop: no deadline here.
	t.Cleanup(func() {
		assert.NoError(t, chromedp.Cancel(ctx), "closing the browser")
		cancel()
		cancelAlloc() // waits for the browser's process to exit
	})
	require.NoError(t, chromedp.Run(ctx), "starting %s", path)
	return ctx
}

// run runs actions in the browser within browserWait, and fails the test
// with what it was doing if they fail.
func run(t *testing.T, ctx context.Context, doing string, actions ...chromedp.Action) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, browserWait+10*time.Second)
	defer cancel()
	require.NoError(t, chromedp.Run(ctx, actions...), doing)
}

// A pageResult is results[name] of the page.
type pageResult struct {
	OK       bool            `json:"ok"`
	Value    json.RawMessage `json:"value"`
	Error    string          `json:"error"`
	Progress string          `json:"progress"`
}

// scenario starts the page's scenario name, start(name, args) — or, with
// args "", awaits the one already started — waits for it to end, and
// decodes its value into v. It fails the test with the scenario's error, or
// with how far it got if it did not end within browserWait.
func scenario(t *testing.T, ctx context.Context, name, args string, v any) {
	t.Helper()
	if args != "" {
		run(t, ctx, "starting "+name, chromedp.Evaluate(fmt.Sprintf(`start(%q, %s)`, name, args), nil))
	}
	var res pageResult
	pctx, cancel := context.WithTimeout(ctx, browserWait+10*time.Second)
	defer cancel()
	err := chromedp.Run(pctx, chromedp.Poll(fmt.Sprintf(`results[%q]`, name), &res, pollEvery, chromedp.WithPollingTimeout(browserWait)))
	if err != nil {
		var at string
		run(t, ctx, "reading the progress of "+name, chromedp.Evaluate(fmt.Sprintf(`String(progress[%q])`, name), &at))
		require.NoError(t, err, "the page's %s did not end within %v; it was at: %s", name, browserWait, at)
	}
	require.True(t, res.OK, "the page's %s failed: %s (it was at: %s)", name, res.Error, res.Progress)
	require.NoError(t, json.Unmarshal(res.Value, v), "the page's %s returned %s", name, res.Value)
}

// failed fails the test if the page's scenario name has ended with an
// error.
func failed(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	var res *pageResult
	run(t, ctx, "reading "+name, chromedp.Evaluate(fmt.Sprintf(`results[%q]`, name), &res))
	if res != nil {
		require.True(t, res.OK, "the page's %s failed: %s (it was at: %s)", name, res.Error, res.Progress)
	}
}

// report returns the module's report on session, from /report.
func report(t *testing.T, base, session string) serverReport {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), browserWait)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/report?session="+session, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "the module's report on session %s", session)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err, "the module's report on session %s", session)
	require.Equal(t, http.StatusOK, resp.StatusCode, "the module's report on session %s: %q", session, body)
	var rep serverReport
	require.NoError(t, json.Unmarshal(body, &rep), "the module's report on session %s: %q", session, body)
	return rep
}
