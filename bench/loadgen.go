package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httputil"
	"slices"
	"strconv"
	"sync"
	"time"
)

// The load generator: a minimal HTTP/1.1 keep-alive client, lighter than
// net/http's (the load generator shares the two cores with the server
// under test), the same for every peer.

// client is one keep-alive HTTP/1.1 connection.
type client struct {
	addr    string
	conn    net.Conn
	br      *bufio.Reader
	bw      *bufio.Writer
	lr      io.LimitedReader
	scratch []byte

	// deadline bounds every request on the connection; zero means none.
	deadline time.Time
}

func newClient(addr string) *client {
	return &client{addr: addr, scratch: make([]byte, 64<<10)}
}

// connect (re)opens the connection.
func (c *client) connect() error {
	c.close()
	conn, err := net.DialTimeout("tcp", c.addr, 5*time.Second)
	if err != nil {
		return err
	}
	if !c.deadline.IsZero() {
		conn.SetDeadline(c.deadline)
	}
	c.conn = conn
	c.br = bufio.NewReaderSize(conn, 64<<10)
	c.bw = bufio.NewWriterSize(conn, 16<<10)
	return nil
}

func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// setDeadline sets the deadline of the connection's requests.
func (c *client) setDeadline(t time.Time) {
	c.deadline = t
	if c.conn != nil {
		c.conn.SetDeadline(t)
	}
}

// errStatus is the error of a response whose status is not 200.
type errStatus int

func (e errStatus) Error() string { return "status " + strconv.Itoa(int(e)) }

// do sends one request: head is the request line and header fields
// (without the blank line that ends them; do adds Content-Length for a
// non-nil body), then body. consume is given the response body and must
// read it to its end; nil discards it. do returns the status and the
// number of body bytes consume read. On any error the connection is
// closed, and reopened by the next do.
func (c *client) do(head string, body []byte, consume func(io.Reader) (int64, error)) (status int, n int64, err error) {
	if c.conn == nil {
		if err := c.connect(); err != nil {
			return 0, 0, err
		}
	}
	status, n, err = c.roundTrip(head, body, consume)
	if err != nil {
		c.close()
	}
	return status, n, err
}

func (c *client) roundTrip(head string, body []byte, consume func(io.Reader) (int64, error)) (int, int64, error) {
	c.bw.WriteString(head)
	if body != nil {
		c.bw.WriteString("Content-Length: ")
		c.bw.WriteString(strconv.Itoa(len(body)))
		c.bw.WriteString("\r\n")
	}
	c.bw.WriteString("\r\n")
	c.bw.Write(body)
	if err := c.bw.Flush(); err != nil {
		return 0, 0, err
	}

	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return 0, 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, 0, fmt.Errorf("malformed status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, 0, fmt.Errorf("malformed status line %q", line)
	}
	length, chunked, closing := int64(-1), false, false
	for {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return 0, 0, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, 0, fmt.Errorf("malformed header line %q", line)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.ParseInt(string(value), 10, 64); err != nil || length < 0 {
				return 0, 0, fmt.Errorf("malformed Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = bytes.EqualFold(value, []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			closing = bytes.EqualFold(value, []byte("close"))
		}
	}
	if status < 200 {
		return 0, 0, fmt.Errorf("unexpected informational response %d", status)
	}

	var r io.Reader
	switch {
	case chunked:
		r = httputil.NewChunkedReader(c.br)
	case length >= 0:
		c.lr = io.LimitedReader{R: c.br, N: length}
		r = &c.lr
	default:
		closing = true
		r = c.br
	}
	var n int64
	if consume == nil {
		n, err = c.discard(r)
	} else {
		n, err = consume(r)
	}
	if err != nil {
		return status, n, err
	}
	if chunked { // the trailer section, up to its blank line
		for {
			line, err := c.br.ReadSlice('\n')
			if err != nil {
				return status, n, err
			}
			if len(bytes.TrimRight(line, "\r\n")) == 0 {
				break
			}
		}
	}
	if closing {
		c.close()
	}
	return status, n, nil
}

// discard reads r to its end.
func (c *client) discard(r io.Reader) (int64, error) {
	var n int64
	for {
		k, err := r.Read(c.scratch)
		n += int64(k)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// get sends a GET and discards the body.
func (c *client) get(path string) (int, int64, error) {
	return c.do("GET "+path+" HTTP/1.1\r\nHost: bench\r\n", nil, nil)
}

// LoadResult is what a fixed-duration load measured. For the WebSocket
// echo a request is a message and its echo.
type LoadResult struct {
	Clients   int     `json:"clients"`
	Seconds   float64 `json:"seconds"`
	Requests  int64   `json:"requests"` // successful requests started in the timed window
	Errors    int64   `json:"errors"`   // failed requests (I/O error, status, wrong body) in the window
	ReqPerSec float64 `json:"req_per_sec"`
	MBPerSec  float64 `json:"mb_per_sec,omitempty"` // request body bytes per second / 1e6 (echo)
	P50us     float64 `json:"p50_us"`
	P90us     float64 `json:"p90_us"`
	P99us     float64 `json:"p99_us"`
	MaxUs     float64 `json:"max_us"`
	FirstErr  string  `json:"first_error,omitempty"`
	// CPU is what each process spent in the timed window, nil if it was
	// not measured; CPUError says why not, if it could not be.
	CPU      *CPUUse `json:"cpu,omitempty"`
	CPUError string  `json:"cpu_error,omitempty"`
	// Timings is how many times the load was timed (see Config.MaxSteal);
	// these figures are the least disturbed timing's.
	Timings int `json:"timings,omitempty"`
}

// A loadConn is one connection of a timed load, used by one goroutine.
type loadConn interface {
	// op makes one round trip, (re)connecting first if needed; after an
	// error the next op starts on a new connection.
	op() error
	close()
}

// httpLoad returns the connections of an HTTP load: op on a keep-alive
// client of addr.
func httpLoad(addr string, op func(*client) error) func(deadline time.Time) loadConn {
	return func(deadline time.Time) loadConn {
		c := newClient(addr)
		c.setDeadline(deadline)
		return httpConn{c, op}
	}
}

type httpConn struct {
	c  *client
	do func(*client) error
}

func (h httpConn) op() error { return h.do(h.c) }
func (h httpConn) close()    { h.c.close() }

// runLoad runs op in a loop on each of clients connections made by
// newConn (whose deadline bounds the whole load): for warmup, then for
// dur, which is timed. Requests that start in the timed window count;
// their latency is from the first byte written to the last byte read.
// bodyBytes is the request body size, for MB/s. If meter is not nil, the
// CPU time of its processes is read when the timed window starts and
// once every request has ended.
func runLoad(clients int, warmup, dur time.Duration, bodyBytes int, meter *cpuMeter, newConn func(deadline time.Time) loadConn) LoadResult {
	start := time.Now().Add(warmup)
	end := start.Add(dur)
	type worker struct {
		lat      []time.Duration
		errs     int64
		firstErr error
	}
	workers := make([]worker, clients)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			c := newConn(end.Add(time.Minute))
			defer c.close()
			w.lat = make([]time.Duration, 0, 1<<16)
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				err := c.op()
				t1 := time.Now()
				if err != nil {
					if !t0.Before(start) {
						w.errs++
						if w.firstErr == nil {
							w.firstErr = err
						}
					}
					time.Sleep(time.Millisecond) // do not spin on a broken peer
					continue
				}
				if !t0.Before(start) {
					w.lat = append(w.lat, t1.Sub(t0))
				}
			}
		}(&workers[i])
	}
	// The CPU reading at the window's start: a timer, as the window is
	// fixed in advance; the requests in flight across either edge (warmup
	// ones at the start, counted ones at the end) roughly cancel out.
	var before cpuReading
	started := make(chan struct{})
	go func() {
		defer close(started)
		if meter != nil {
			<-time.After(time.Until(start))
			before = meter.read()
		}
	}()
	wg.Wait()
	<-started

	res := LoadResult{Clients: clients, Seconds: dur.Seconds()}
	if meter != nil {
		res.CPU, res.CPUError = meter.between(before, meter.read())
	}
	var lat []time.Duration
	for _, w := range workers {
		lat = append(lat, w.lat...)
		res.Errors += w.errs
		if w.firstErr != nil && res.FirstErr == "" {
			res.FirstErr = w.firstErr.Error()
		}
	}
	res.Requests = int64(len(lat))
	res.ReqPerSec = float64(res.Requests) / dur.Seconds()
	res.MBPerSec = res.ReqPerSec * float64(bodyBytes) / 1e6
	if len(lat) > 0 {
		slices.Sort(lat)
		q := func(p float64) float64 {
			return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / 1e3
		}
		res.P50us, res.P90us, res.P99us = q(0.50), q(0.90), q(0.99)
		res.MaxUs = float64(lat[len(lat)-1]) / 1e3
	}
	return res
}

// smallHead is the request of GET /small.
const smallHead = "GET /small HTTP/1.1\r\nHost: bench\r\n"

// smallOp is GET /small: status 200 and a 100-byte body.
func smallOp(c *client) error {
	status, n, err := c.do(smallHead, nil, nil)
	if err != nil {
		return err
	}
	if status != 200 {
		return errStatus(status)
	}
	if n != int64(len(smallBody)) {
		return fmt.Errorf("/small: body of %d bytes", n)
	}
	return nil
}

// echoOp returns the op of POST /echo with body: status 200 and the body
// back, byte for byte.
func echoOp(body []byte) func(*client) error {
	const head = "POST /echo HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
	return func(c *client) error {
		status, n, err := c.do(head, body, func(r io.Reader) (int64, error) {
			return compareBody(r, body, c.scratch)
		})
		if err != nil {
			return err
		}
		if status != 200 {
			return errStatus(status)
		}
		if n != int64(len(body)) {
			return fmt.Errorf("/echo: %d bytes back of %d", n, len(body))
		}
		return nil
	}
}

// errMismatch is the error of an echo that differs from what was sent.
var errMismatch = errors.New("/echo: the body came back different")

// compareBody reads r to its end, checking that it is a prefix of want.
func compareBody(r io.Reader, want, buf []byte) (int64, error) {
	var n int64
	for {
		k, err := r.Read(buf)
		if k > 0 {
			if n+int64(k) > int64(len(want)) || !bytes.Equal(buf[:k], want[n:n+int64(k)]) {
				return n, errMismatch
			}
			n += int64(k)
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// echoBody returns the n-byte body that /echo is sent: not all one byte,
// so that a shifted or reordered echo shows.
func echoBody(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// StreamResult is what a stream workload measured: the HTTP /stream or
// the WebSocket one.
type StreamResult struct {
	Bytes    int64   `json:"bytes"`
	Chunk    int     `json:"chunk"`
	Seconds  float64 `json:"seconds"`
	MBPerSec float64 `json:"mb_per_sec"` // bytes / seconds / 1e6
	// CPU is what each process spent from the request to the last byte,
	// nil if it was not measured; CPUError says why not, if it could not
	// be.
	CPU      *CPUUse `json:"cpu,omitempty"`
	CPUError string  `json:"cpu_error,omitempty"`
	// Timings is as LoadResult's.
	Timings int `json:"timings,omitempty"`
}

// timeStream times fetch, which must return the bytes it received, and
// checks that they are n. If meter is not nil, the CPU time of its
// processes is read just before and just after.
func timeStream(n int64, chunk int, meter *cpuMeter, fetch func() (int64, error)) (StreamResult, error) {
	var before cpuReading
	if meter != nil {
		before = meter.read()
	}
	t0 := time.Now()
	got, err := fetch()
	sec := time.Since(t0).Seconds()
	res := StreamResult{Bytes: n, Chunk: chunk, Seconds: sec, MBPerSec: float64(n) / sec / 1e6}
	if meter != nil {
		res.CPU, res.CPUError = meter.between(before, meter.read())
	}
	if err != nil {
		return StreamResult{}, err
	}
	if got != n {
		return StreamResult{}, fmt.Errorf("%d bytes of %d", got, n)
	}
	return res, nil
}

// runStream fetches one /stream response of n bytes in chunk-byte writes
// and times it from the request to the last byte.
func runStream(addr string, n int64, chunk int, meter *cpuMeter) (StreamResult, error) {
	c := newClient(addr)
	defer c.close()
	c.setDeadline(time.Now().Add(10 * time.Minute))
	path := fmt.Sprintf("/stream?bytes=%d&chunk=%d", n, chunk)
	return timeStream(n, chunk, meter, func() (int64, error) {
		status, got, err := c.get(path)
		if err == nil && status != 200 {
			err = errStatus(status)
		}
		return got, err
	})
}
