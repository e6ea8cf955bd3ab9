package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
)

// This file holds the logs module's WebSocket, GET /api/logs/ws, which the
// page's log pane follows. It is served in the logs module's child, like
// the module's other endpoints: coder/websocket's Accept hijacks the
// connection there, and the parent, seeing the hijack, hijacks the page's
// connection and tunnels the bytes between the two (the library's
// "Upgrades and WebSocket"). Nothing of it runs in the parent.
//
// The socket starts at ?from=, an offset in the file as a line's next
// gives, else at the first of the file's last ?tail= lines (1 to maxTail),
// else at the end. Each message is a JSON text message, a wsMessage:
//
//	from the module:
//	{"type":"hello","pid":…,"incarnation":…,"offset":…}
//	        first: the child that serves the socket, and the offset its
//	        lines start at
//	{"type":"line","offset":…,"next":…,"text":"…"}
//	        each line of the file, in order, as it is appended: the offset
//	        where it starts and the one just past it, which is the from= to
//	        resume after it, and the line without its newline
//	{"type":"error","text":"…"}
//	        a message of the client's that the module could not act on
//
//	from the client:
//	{"type":"mark","text":"…"}
//	        appends the line "<time> pid=… incarnation=… mark: <text>" to
//	        the file, which then comes back as a line; text is 1 to
//	        maxMark characters, control characters counting as spaces
//
// A message from the client that is not JSON closes the socket (1007,
// coder/websocket's wsjson does so). When the child begins to drain (a
// restart, a recycle or a shutdown) the module closes the socket with a
// close frame, 1001 going away: the page reconnects with ?from= the last
// line's next, reaches the child that replaces this one, and so loses no
// line and gets none twice. When the child dies the socket just ends
// (1006 at the page), and the page reconnects the same way.

// Bounds of GET /api/logs/ws.
const (
	maxMark          = 200              // characters of a mark's text
	maxClientMessage = 4 << 10          // bytes of one message from the client
	wsWriteTimeout   = 10 * time.Second // for one message to the client; past it the socket closes
)

// goingAway is the reason of the close frame a draining child sends. A
// close frame's reason must fit in 123 bytes.
const goingAway = "this child of the logs module is draining: reconnect with ?from="

// wsMessage is one message of GET /api/logs/ws, either way, but hello.
type wsMessage struct {
	Type   string `json:"type"`           // "line" or "error" from the module; "mark" from the client
	Offset int64  `json:"offset"`         // line: where it starts
	Next   int64  `json:"next,omitempty"` // line: the offset just past it
	Text   string `json:"text,omitempty"` // line: the line; error: what went wrong; mark: what to append
}

// wsHello is the module's first message of GET /api/logs/ws.
type wsHello struct {
	Type        string `json:"type"` // "hello"
	Pid         int    `json:"pid"`
	Incarnation int    `json:"incarnation"`
	Offset      int64  `json:"offset"` // where the lines start
}

// serveWebSocket answers GET /api/logs/ws: it follows the file from the
// offset wsStart gives, sending each line as it is appended, and appends
// the marks the client sends, until the client closes the socket or goes
// away, or the child begins to drain.
func (m *logsModule) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	fl, err := openFollower(m.file)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer fl.close()
	off, status, err := wsStart(r, fl)
	if err == nil {
		err = fl.seek(off)
	}
	if err != nil {
		http.Error(w, err.Error(), status)
		return
	}
	// No compression (Accept's default). coder/websocket deflates at
	// flate.BestSpeed, which codes a flush of under 128 bytes alone, with
	// Huffman codes only and no window, and a line's message is about
	// 116 bytes: measured over 1,001 of them, permessage-deflate with
	// context takeover (and CompressionThreshold 1) took the wire from
	// 118,660 bytes to 114,001 (4%), the time from 19 ms to 74 ms, and
	// would hold a 1.2 MB flate writer per socket. The request's Origin
	// must be its Host (Accept's default): the page is served by the same
	// dashboard.
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered the client, saying why
	}
	defer c.CloseNow()
	c.SetReadLimit(maxClientMessage)

	ctx := r.Context()
	send := func(msg wsMessage) error {
		wctx, cancel := context.WithTimeout(ctx, wsWriteTimeout)
		defer cancel()
		return wsjson.Write(wctx, c, msg)
	}
	read := make(chan error, 1) // readLoop's end
	go func() { read <- m.readLoop(ctx, c, send) }()

	hctx, cancel := context.WithTimeout(ctx, wsWriteTimeout)
	err = wsjson.Write(hctx, c, wsHello{Type: "hello", Pid: os.Getpid(), Incarnation: m.env.Incarnation, Offset: off})
	cancel()
	if err != nil {
		return
	}
	tick := time.NewTicker(followInterval)
	defer tick.Stop()
	for {
		changed := m.appended() // before reading, so that no line is missed
		for {
			line, start, end, ok := fl.next()
			if !ok {
				break
			}
			if send(wsMessage{Type: "line", Offset: start, Next: end, Text: string(line)}) != nil {
				return
			}
		}
		select {
		case <-m.ctx.Done():
			// The close handshake ends readLoop: its Read gets the
			// client's close frame.
			c.Close(websocket.StatusGoingAway, goingAway)
			<-read
			return
		case <-read:
			// The client closed the socket (Read has answered its
			// close frame), or the connection failed.
			return
		case <-changed:
		case <-tick.C:
		}
	}
}

// readLoop reads the client's messages and acts on them, answering with
// send those it cannot act on, until a read fails, as it does when the
// socket closes. It returns the read's error.
func (m *logsModule) readLoop(ctx context.Context, c *websocket.Conn, send func(wsMessage) error) error {
	for {
		var msg wsMessage
		if err := wsjson.Read(ctx, c, &msg); err != nil {
			return err
		}
		var err error
		switch msg.Type {
		case "mark":
			var text string
			if text, err = markText(msg.Text); err == nil {
				err = m.appendLine("mark: " + text)
			}
		default:
			err = fmt.Errorf("unknown message type %q: the client may send {\"type\":\"mark\",\"text\":\"…\"}", msg.Type)
		}
		if err != nil {
			if err := send(wsMessage{Type: "error", Text: err.Error()}); err != nil {
				return err
			}
		}
	}
}

// markText returns the text of a mark as it is appended: s with each
// control character (a newline, say) replaced by a space, and trimmed; or
// an error if that leaves nothing or more than maxMark characters.
func markText(s string) (string, error) {
	s = strings.TrimSpace(strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s))
	if n := utf8.RuneCountInString(s); n == 0 || n > maxMark {
		return "", fmt.Errorf("a mark's text must hold 1 to %d characters; this one holds %d", maxMark, n)
	}
	return s, nil
}

// wsStart returns where a WebSocket of r over fl's file starts: at ?from=
// (as startOffset reads it), else at the first of the last ?tail= lines,
// else at the end. If it cannot, it returns the status to answer with.
func wsStart(r *http.Request, fl *follower) (off int64, status int, err error) {
	q := r.URL.Query()
	if q.Has("from") || !q.Has("tail") {
		off, err := startOffset(r, fl.size)
		return off, http.StatusBadRequest, err
	}
	n, err := strconv.Atoi(q.Get("tail"))
	if err != nil || n < 1 || n > maxTail {
		return 0, http.StatusBadRequest, fmt.Errorf("tail must be a number of lines from 1 to %d", maxTail)
	}
	tail, end, err := lastLines(fl.f, n)
	if err != nil {
		return 0, http.StatusInternalServerError, fmt.Errorf("reading the file's last lines: %w", err)
	}
	return end - int64(len(tail)), http.StatusOK, nil
}
