package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// pipePeer measures the physical limit of streaming over a pipe between
// two processes, with the same HTTP hop to the load generator as the
// other peers. A persistent child writes raw bytes to its stdout, a pipe;
// no HTTP and no framing cross the pipe. For GET /stream?bytes=N&chunk=C
// the server sends (N, C) to the child's stdin as two big-endian uint64s;
// the child writes N bytes to its stdout in C-byte writes; the server reads
// them C bytes at a time and writes each chunk to the HTTP response,
// flushing after each, exactly as the handler does. One stream at a time;
// every other route is 404 (the workloads other than /stream are n/a for
// this peer). The pipe has the kernel's default size, as subproc's pipes.
type pipePeer struct {
	mux *http.ServeMux

	mu     sync.Mutex // one stream at a time on the pipe
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout io.ReadCloser
	broken error // set when the pipe's byte count can no longer be trusted
}

func startPipe() (*pipePeer, error) {
	p := &pipePeer{mux: http.NewServeMux()}
	p.mux.HandleFunc("GET /stream", p.serveStream)
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), envRole+"=pipe-child")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var err error
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if p.stdout, err = cmd.StdoutPipe(); err != nil {
		return nil, err
	}
	// The same pipe capacity as subproc asks for its own pipes (1 MiB,
	// Linux's default limit for an unprivileged process), so that the two
	// are compared on the same pipe.
	if f, ok := p.stdout.(*os.File); ok {
		if sc, err := f.SyscallConn(); err == nil {
			sc.Control(func(fd uintptr) {
				const fSetPipeSize = 1031 // F_SETPIPE_SZ
				syscall.Syscall(syscall.SYS_FCNTL, fd, fSetPipeSize, 1<<20)
			})
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p.cmd = cmd
	return p, nil
}

func (p *pipePeer) ServeHTTP(w http.ResponseWriter, r *http.Request) { p.mux.ServeHTTP(w, r) }

// serveStream relays N bytes from the child's pipe to the response.
func (p *pipePeer) serveStream(w http.ResponseWriter, r *http.Request) {
	n, c, err := streamParams(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.broken != nil {
		http.Error(w, p.broken.Error(), http.StatusBadGateway)
		return
	}
	var req [16]byte
	binary.BigEndian.PutUint64(req[:8], uint64(n))
	binary.BigEndian.PutUint64(req[8:], uint64(c))
	if _, err := p.stdin.Write(req[:]); err != nil {
		p.broken = fmt.Errorf("pipe child: %w", err)
		http.Error(w, p.broken.Error(), http.StatusBadGateway)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	rc := http.NewResponseController(w)
	buf := make([]byte, min(n, int64(c)))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := io.ReadFull(p.stdout, buf[:k]); err != nil {
			p.broken = fmt.Errorf("pipe child: %w", err)
			panic(http.ErrAbortHandler)
		}
		n -= k
		if _, err := w.Write(buf[:k]); err != nil {
			break
		}
		if err := rc.Flush(); err != nil {
			break
		}
	}
	// The client went away: drain the rest so the next stream starts at
	// its first byte.
	if _, err := io.CopyN(io.Discard, p.stdout, n); err != nil {
		p.broken = fmt.Errorf("pipe child: %w", err)
	}
}

// ChildPid returns the child's pid.
func (p *pipePeer) ChildPid() int { return p.cmd.Process.Pid }

// Close ends the child by closing its stdin.
func (p *pipePeer) Close() error {
	p.stdin.Close()
	return p.cmd.Wait()
}

// runPipeChild serves stream requests from in on out until in ends.
func runPipeChild(in io.Reader, out io.Writer) error {
	var req [16]byte
	var chunk []byte
	for {
		if _, err := io.ReadFull(in, req[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		n := int64(binary.BigEndian.Uint64(req[:8]))
		c := int(binary.BigEndian.Uint64(req[8:]))
		if c <= 0 || c > maxChunk || n < 0 {
			return fmt.Errorf("bad request n=%d chunk=%d", n, c)
		}
		if len(chunk) != c {
			chunk = make([]byte, c)
			for i := range chunk {
				chunk[i] = 'c'
			}
		}
		for n > 0 {
			k := min(n, int64(c))
			if _, err := out.Write(chunk[:k]); err != nil {
				return err
			}
			n -= k
		}
	}
}
