package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/fbbf71ac/subproc"
)

// The logs module stands for a module that owns a log file: it appends a
// timestamped line to the file every half second, serves the file's last
// lines (GET /api/logs/tail?n=20), follows it as a server-sent event stream
// (GET /api/logs/stream), and as a WebSocket (GET /api/logs/ws, in
// logsws.go) that also takes lines to append, which the page's log pane
// uses.
//
// Both follows resume where they left off: each line comes with the offset
// in the file just past it, and a follow starts at such an offset: the
// Last-Event-ID header, which EventSource sends when it reconnects, or
// ?from=, which the tail's X-Log-Offset header gives. The file is appended
// to by every incarnation of the module, so a client that reconnects after
// a restart gets the lines the old child wrote after it lost the old one,
// then the new child's, and none twice.

func init() { subproc.Register("logs", newLogsModule) }

// logsConfig is the logs module's Options.Config, as JSON.
type logsConfig struct {
	File string `json:"file"` // the file to append to and serve; default <LogDir>/events.txt
}

// Intervals of the logs module.
const (
	appendInterval = 500 * time.Millisecond // between two lines appended to the file
	followInterval = 200 * time.Millisecond // between two looks for new lines when streaming
)

// maxTail bounds the n of /api/logs/tail.
const maxTail = 1000

// logsModule serves one log file.
type logsModule struct {
	file string          // fixed
	env  *subproc.Env    // fixed
	ctx  context.Context // fixed; the ModuleFunc's: ends when the child begins to drain

	mu      sync.Mutex    // guards the fields below
	out     *os.File      // the file, open for appending; nil once appendLoop has closed it
	changed chan struct{} // closed, and replaced, when this child appends a line
}

// newLogsModule is the logs module's subproc.ModuleFunc. It starts the
// goroutine that appends to the file, which runs until ctx ends.
func newLogsModule(ctx context.Context, env *subproc.Env) (http.Handler, error) {
	var cfg logsConfig
	if len(env.Config) > 0 {
		if err := json.Unmarshal(env.Config, &cfg); err != nil {
			return nil, fmt.Errorf("bad config %q: %w", env.Config, err)
		}
	}
	if cfg.File == "" {
		if env.LogDir == "" {
			return nil, errors.New("no file to write: set Options.LogDir or a file in Options.Config")
		}
		cfg.File = filepath.Join(env.LogDir, "events.txt")
	}
	f, err := os.OpenFile(cfg.File, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err // the parent's *StartError shows it
	}
	env.Logger.Info("logs module started", "file", cfg.File, "incarnation", env.Incarnation)
	m := &logsModule{file: cfg.File, env: env, ctx: ctx, out: f, changed: make(chan struct{})}
	go m.appendLoop()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/logs/tail", m.serveTail)
	mux.HandleFunc("GET /api/logs/stream", m.serveStream)
	mux.HandleFunc("GET /api/logs/ws", m.serveWebSocket)
	return mux, nil
}

// appendLoop appends a timestamped line to the file now and every
// appendInterval, until the module's ctx ends; then it closes the file. It
// also records every tenth line in the module's own log, env.Logger.
func (m *logsModule) appendLoop() {
	defer func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.out.Close()
		m.out = nil
	}()
	tick := time.NewTicker(appendInterval)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		if err := m.appendLine(fmt.Sprintf("seq=%d", seq)); err != nil {
			m.env.Logger.Error("appending to the file", "err", err)
		}
		if seq%10 == 0 {
			m.env.Logger.Info("appended", "seq", seq)
		}
		select {
		case <-m.ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// appendLine appends a line to the file: the time, the child's pid and
// incarnation, then text, which must hold no newline. The line is one
// write to a file opened with O_APPEND, so that it lands whole after the
// lines of every other writer, another incarnation's too. Then it wakes
// the follows of this child.
func (m *logsModule) appendLine(text string) error {
	line := fmt.Sprintf("%s pid=%d incarnation=%d %s\n",
		time.Now().Format(time.RFC3339Nano), os.Getpid(), m.env.Incarnation, text)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.out == nil {
		return errors.New("this child of the logs module is draining and appends no more: send it again once the page has reconnected")
	}
	if _, err := m.out.WriteString(line); err != nil {
		return err
	}
	close(m.changed)
	m.changed = make(chan struct{})
	return nil
}

// appended returns a channel closed when this child next appends a line.
// Lines another child appends (as while one replaces the other) show no
// sooner than the next followInterval.
func (m *logsModule) appended() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// serveTail answers with the file's last n lines as plain text.
func (m *logsModule) serveTail(w http.ResponseWriter, r *http.Request) {
	n := 20
	if s := r.URL.Query().Get("n"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 || v > maxTail {
			http.Error(w, fmt.Sprintf("n must be a number from 1 to %d", maxTail), http.StatusBadRequest)
			return
		}
		n = v
	}
	f, err := os.Open(m.file)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	tail, end, err := lastLines(f, n)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	// Where a stream that follows this tail starts: ?from= of
	// GET /api/logs/stream.
	w.Header().Set("X-Log-Offset", strconv.FormatInt(end, 10))
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write(tail)
}

// lastLines returns the last n complete lines of f, and the offset just
// past them, reading it backwards from its end in blocks, so that a long
// file costs no more than its tail.
func lastLines(f *os.File, n int) (tail []byte, end int64, err error) {
	const block = 16 << 10
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	var buf []byte // the end of the file, from off
	off := fi.Size()
	for off > 0 {
		step := int(min(block, off))
		off -= int64(step)
		b := make([]byte, step, step+len(buf))
		if _, err := f.ReadAt(b, off); err != nil {
			return nil, 0, err
		}
		buf = append(b, buf...)
		if bytes.Count(buf, []byte{'\n'}) > n {
			break
		}
	}
	// Drop a partial last line (being written now) and keep n lines.
	if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
		buf = buf[:i+1]
	} else {
		return nil, off, nil
	}
	end = off + int64(len(buf))
	lines := 0
	for i := len(buf) - 2; i >= 0; i-- {
		if buf[i] == '\n' {
			if lines++; lines == n {
				return buf[i+1:], end, nil
			}
		}
	}
	return buf, end, nil
}

// startOffset returns where a stream of r over a file of size starts: at
// r's Last-Event-ID, else its ?from=, else the end. An offset past the end
// (the file was replaced by a shorter one) starts at 0.
func startOffset(r *http.Request, size int64) (int64, error) {
	s := r.Header.Get("Last-Event-ID")
	if s == "" {
		s = r.URL.Query().Get("from")
	}
	if s == "" {
		return size, nil
	}
	off, err := strconv.ParseInt(s, 10, 64)
	if err != nil || off < 0 {
		return 0, fmt.Errorf("the offset to resume from, %q, must be a byte offset in the file, as X-Log-Offset of GET /api/logs/tail gives", s)
	}
	if off > size {
		return 0, nil
	}
	return off, nil
}

// serveStream follows the file as text/event-stream: one event per line
// from the offset startOffset gives, with the offset past the line as its
// id, flushed as it comes, until the client goes away or the child begins
// to drain (at a restart or a shutdown). A stream never ends by itself, so
// it must end at a drain, or the drain would wait for it until its grace
// period ends; the client (EventSource does) reconnects, and reaches the
// child that replaces this one.
func (m *logsModule) serveStream(w http.ResponseWriter, r *http.Request) {
	fl, err := openFollower(m.file)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer fl.close()
	off, err := startOffset(r, fl.size)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := fl.seek(off); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	// A comment line sends the header now, so the client sees the stream
	// open before the first line arrives.
	fmt.Fprintf(w, ": following %s from byte %d\n\n", filepath.Base(m.file), off)
	if err := rc.Flush(); err != nil {
		return
	}

	tick := time.NewTicker(followInterval)
	defer tick.Stop()
	for {
		changed := m.appended() // before reading, so that no line is missed
		sent := false
		for {
			line, _, end, ok := fl.next()
			if !ok {
				break
			}
			if _, err := fmt.Fprintf(w, "id: %d\ndata: %s\n\n", end, line); err != nil {
				return
			}
			sent = true
		}
		if sent {
			if err := rc.Flush(); err != nil {
				return
			}
		}
		select {
		case <-r.Context().Done():
			return
		case <-m.ctx.Done():
			return
		case <-changed:
		case <-tick.C:
		}
	}
}

// A follower reads a file's complete lines, from an offset on, as they are
// appended. It is used by one goroutine.
type follower struct {
	f       *os.File      // fixed
	size    int64         // fixed; the file's size when it was opened
	rd      *bufio.Reader // reads f from off + len(partial)
	off     int64         // the offset of the next line
	partial []byte        // the start of the next line, read up to the file's end
}

// openFollower opens the file at path, to follow from its start until
// seek says otherwise.
func openFollower(path string) (*follower, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &follower{f: f, size: fi.Size(), rd: bufio.NewReader(f)}, nil
}

// seek makes off the offset of the next line.
func (fl *follower) seek(off int64) error {
	if _, err := fl.f.Seek(off, io.SeekStart); err != nil {
		return err
	}
	fl.rd.Reset(fl.f)
	fl.off, fl.partial = off, fl.partial[:0]
	return nil
}

// next returns the next complete line in the file, without its newline,
// the offset where it starts and the one just past it; ok is false if the
// file holds no complete line past the last one returned yet. The line is
// valid until the next call.
func (fl *follower) next() (line []byte, start, end int64, ok bool) {
	chunk, err := fl.rd.ReadBytes('\n')
	fl.partial = append(fl.partial, chunk...)
	if err != nil {
		return nil, 0, 0, false // io.EOF: a later call reads on
	}
	start = fl.off
	fl.off += int64(len(fl.partial))
	line = bytes.TrimRight(fl.partial, "\r\n")
	fl.partial = fl.partial[:0]
	return line, start, fl.off, true
}

// close closes the file.
func (fl *follower) close() { fl.f.Close() }
