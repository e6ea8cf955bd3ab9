package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
)

// The WebSocket workload, with gorilla/websocket on both sides: the
// handler's two upgrade routes, and the load generator's clients.
//
//	GET /ws/echo                      echoes every message, with its type, until the client goes
//	GET /ws/stream?bytes=N&chunk=C    N bytes in binary messages of C bytes, then a close (1000)
//
// Both sides use 64 KiB buffers, so that a 64 KiB message is one write of
// the connection on the server side (gorilla adds room for the frame
// header) and one read on the client's.

const wsBufferSize = 64 << 10

// wsUpgrader upgrades the handler's WebSocket requests. The load
// generator sends no Origin, which CheckOrigin's default accepts.
var wsUpgrader = websocket.Upgrader{ReadBufferSize: wsBufferSize, WriteBufferSize: wsBufferSize}

// serveWSEcho echoes every message, streaming it through a pooled 32 KiB
// buffer, until the connection fails or closes.
func serveWSEcho(w http.ResponseWriter, r *http.Request) {
	c, err := wsUpgrader.Upgrade(w, r, nil) // Upgrade has answered the error
	if err != nil {
		return
	}
	defer c.Close()
	bp := echoBufs.Get().(*[]byte)
	defer echoBufs.Put(bp)
	for {
		typ, rd, err := c.NextReader()
		if err != nil {
			return
		}
		wr, err := c.NextWriter(typ)
		if err != nil {
			return
		}
		if _, err := io.CopyBuffer(wr, rd, *bp); err != nil {
			return
		}
		if err := wr.Close(); err != nil {
			return
		}
	}
}

// serveWSStream writes bytes=N bytes in binary messages of chunk=C bytes,
// then closes with 1000 and waits (up to 10 s) for the client's close.
func serveWSStream(w http.ResponseWriter, r *http.Request) {
	n, chunk, err := streamParams(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	c, err := wsUpgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("w"), int(min(n, int64(chunk))))
	for n > 0 {
		k := min(n, int64(len(msg)))
		if err := c.WriteMessage(websocket.BinaryMessage, msg[:k]); err != nil {
			return
		}
		n -= k
	}
	deadline := time.Now().Add(10 * time.Second)
	if err := c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), deadline); err != nil {
		return
	}
	c.SetReadDeadline(deadline)
	for {
		if _, _, err := c.NextReader(); err != nil {
			return // the client's close, or the deadline
		}
	}
}

// dialWS opens a WebSocket connection to path on the server at addr,
// whose reads and writes must end by deadline.
func dialWS(addr, path string, deadline time.Time) (*websocket.Conn, error) {
	d := websocket.Dialer{
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   wsBufferSize,
		WriteBufferSize:  wsBufferSize,
	}
	c, resp, err := d.Dial("ws://"+addr+path, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("WebSocket handshake of %s: status %d: %w", path, resp.StatusCode, err)
		}
		return nil, fmt.Errorf("WebSocket handshake of %s: %w", path, err)
	}
	c.SetReadDeadline(deadline)
	c.SetWriteDeadline(deadline)
	return c, nil
}

// wsEchoLoad returns the connections of the WebSocket echo load: each op
// sends msg as a binary message and reads its echo, which must be msg
// byte for byte.
func wsEchoLoad(addr string, msg []byte) func(deadline time.Time) loadConn {
	return func(deadline time.Time) loadConn {
		return &wsEchoConn{addr: addr, deadline: deadline, msg: msg, buf: make([]byte, 32<<10)}
	}
}

// wsEchoConn is one connection of the WebSocket echo load; it dials on
// its first op (in the warmup) and again after a failed one.
type wsEchoConn struct {
	addr     string
	deadline time.Time
	msg      []byte
	buf      []byte
	conn     *websocket.Conn // nil until dialled, and after an error
}

func (w *wsEchoConn) op() error {
	if w.conn == nil {
		c, err := dialWS(w.addr, "/ws/echo", w.deadline)
		if err != nil {
			return err
		}
		w.conn = c
	}
	if err := w.roundTrip(); err != nil {
		w.close()
		return err
	}
	return nil
}

// errWSMismatch is the error of a WebSocket echo that differs from what
// was sent.
var errWSMismatch = errors.New("/ws/echo: the message came back different")

func (w *wsEchoConn) roundTrip() error {
	if err := w.conn.WriteMessage(websocket.BinaryMessage, w.msg); err != nil {
		return err
	}
	typ, r, err := w.conn.NextReader()
	if err != nil {
		return err
	}
	if typ != websocket.BinaryMessage {
		return fmt.Errorf("/ws/echo: a message of type %d came back, want binary", typ)
	}
	n, err := compareBody(r, w.msg, w.buf)
	if errors.Is(err, errMismatch) {
		return errWSMismatch
	}
	if err != nil {
		return err
	}
	if n != int64(len(w.msg)) {
		return fmt.Errorf("/ws/echo: %d bytes back of %d", n, len(w.msg))
	}
	return nil
}

func (w *wsEchoConn) close() {
	if w.conn != nil {
		w.conn.Close()
		w.conn = nil
	}
}

// runWSStream receives one WebSocket stream of n bytes in chunk-byte
// messages and times it from the handshake's request to the server's
// close.
func runWSStream(addr string, n int64, chunk int, meter *cpuMeter) (StreamResult, error) {
	path := fmt.Sprintf("/ws/stream?bytes=%d&chunk=%d", n, chunk)
	buf := make([]byte, wsBufferSize)
	return timeStream(n, chunk, meter, func() (int64, error) {
		c, err := dialWS(addr, path, time.Now().Add(10*time.Minute))
		if err != nil {
			return 0, err
		}
		defer c.Close()
		var got int64
		for {
			typ, r, err := c.NextReader()
			if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
				return got, nil // gorilla has answered the close
			}
			if err != nil {
				return got, err
			}
			if typ != websocket.BinaryMessage {
				return got, fmt.Errorf("/ws/stream: a message of type %d, want binary", typ)
			}
			for {
				k, err := r.Read(buf)
				got += int64(k)
				if err == io.EOF {
					break
				}
				if err != nil {
					return got, err
				}
			}
		}
	})
}
