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
	"time"

	"github.com/fbbf71ac/subproc"
)

// The logs module stands for a module that owns a log file: it appends a
// timestamped line to the file every half second, serves the file's last
// lines (GET /api/logs/tail?n=20) and follows it as a server-sent event
// stream (GET /api/logs/stream).
//
// The stream resumes where it left off: each line's event id is the offset
// in the file just past it, and a stream starts at the offset of the
// Last-Event-ID header, which EventSource sends when it reconnects, or else
// of ?from=, which the tail's X-Log-Offset header gives. The file is
// appended to by every incarnation of the module, so a client that
// reconnects after a restart gets the lines the old child wrote after the
// stream ended, then the new child's, and none twice.

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
	ctx  context.Context // fixed; the ModuleFunc's: ends when the child begins to drain
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
	go appendLoop(ctx, env, f)

	m := &logsModule{file: cfg.File, ctx: ctx}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/logs/tail", m.serveTail)
	mux.HandleFunc("GET /api/logs/stream", m.serveStream)
	return mux, nil
}

// appendLoop appends a timestamped line to f now and every appendInterval,
// until ctx ends; then it closes f. It also records every tenth line in the
// module's own log, env.Logger.
func appendLoop(ctx context.Context, env *subproc.Env, f *os.File) {
	defer f.Close()
	tick := time.NewTicker(appendInterval)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		line := fmt.Sprintf("%s pid=%d incarnation=%d seq=%d\n",
			time.Now().Format(time.RFC3339Nano), os.Getpid(), env.Incarnation, seq)
		if _, err := f.WriteString(line); err != nil {
			env.Logger.Error("appending to the file", "err", err)
		}
		if seq%10 == 0 {
			env.Logger.Info("appended", "seq", seq)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
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
// id, flushed as it comes, until the client
// goes away or the child begins to drain (at a restart or a shutdown). A
// stream never ends by itself, so it must end at a drain, or the drain
// would wait for it until its grace period ends; the client (EventSource
// does) reconnects, and reaches the child that replaces this one.
func (m *logsModule) serveStream(w http.ResponseWriter, r *http.Request) {
	f, err := os.Open(m.file)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	off, err := startOffset(r, fi.Size())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
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

	rd := bufio.NewReader(f)
	var partial []byte // a line read up to the file's current end
	tick := time.NewTicker(followInterval)
	defer tick.Stop()
	for {
		sent := false
		for {
			chunk, err := rd.ReadBytes('\n')
			partial = append(partial, chunk...)
			if err != nil {
				break // io.EOF: wait for more
			}
			off += int64(len(partial))
			line := bytes.TrimRight(partial, "\r\n")
			partial = partial[:0]
			if _, err := fmt.Fprintf(w, "id: %d\ndata: %s\n\n", off, line); err != nil {
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
		case <-tick.C:
		}
	}
}
