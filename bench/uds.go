package main

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// udsPeer forwards requests with httputil.ReverseProxy to a child that
// serves the handler with net/http on a unix socket. A goroutine restarts
// the child whenever it exits: it respawns as soon as cmd.Wait returns and
// then waits until the socket accepts connections. Requests that arrive
// while no child listens get the proxy's 502 Bad Gateway.
type udsPeer struct {
	*httputil.ReverseProxy
	dir, sock string

	mu       sync.Mutex
	cmd      *exec.Cmd // the running child, nil between two
	stopping bool
	done     chan struct{} // closed when the restart loop returns
}

// startUDS starts the first child and returns once its socket accepts.
func startUDS() (*udsPeer, error) {
	dir, err := os.MkdirTemp("", "bench-uds-")
	if err != nil {
		return nil, err
	}
	p := &udsPeer{dir: dir, sock: filepath.Join(dir, "http.sock"), done: make(chan struct{})}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", p.sock)
		},
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		WriteBufferSize:     64 << 10,
		ReadBufferSize:      64 << 10,
	}
	target := &url.URL{Scheme: "http", Host: "uds"}
	p.ReverseProxy = &httputil.ReverseProxy{
		Rewrite:    func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:  transport,
		BufferPool: bufferPool{},
		ErrorLog:   log.New(os.Stderr, "uds proxy: ", log.LstdFlags),
	}
	ready := make(chan error, 1)
	go p.loop(ready)
	if err := <-ready; err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// loop runs children one after the other until Close. The first child's
// readiness (or failure to start) is reported on ready.
func (p *udsPeer) loop(ready chan<- error) {
	defer close(p.done)
	first := true
	for {
		cmd := exec.Command("/proc/self/exe")
		cmd.Env = append(os.Environ(), envRole+"=uds-child", envSocket+"="+p.sock)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		p.mu.Lock()
		if p.stopping {
			p.mu.Unlock()
			return
		}
		err := cmd.Start()
		if err == nil {
			p.cmd = cmd
		}
		p.mu.Unlock()
		if err != nil {
			if first {
				ready <- err
				return
			}
			log.Printf("uds: starting child: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		exited := make(chan struct{})
		go func() {
			cmd.Wait()
			close(exited)
		}()
		if err := waitAccept(p.sock, exited); err != nil && first {
			ready <- err
			return
		}
		if first {
			ready <- nil
			first = false
		}
		<-exited
		p.mu.Lock()
		p.cmd = nil
		p.mu.Unlock()
	}
}

// waitAccept waits until the unix socket at path accepts a connection, or
// the child exits.
func waitAccept(path string, exited <-chan struct{}) error {
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return errors.New("uds child exited before its socket accepted")
		case <-time.After(time.Millisecond):
		}
	}
}

// ServeHTTP forwards the request. Full duplex is enabled first: the proxy
// cannot know whether the child's handler reads the request body while it
// writes its response (as /echo does), and without it net/http closes an
// HTTP/1 request body once the response starts, which cuts the proxy's
// upload to the child short and, with it, the response.
func (p *udsPeer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	http.NewResponseController(w).EnableFullDuplex()
	p.ReverseProxy.ServeHTTP(w, r)
}

// ChildPid returns the running child's pid.
func (p *udsPeer) ChildPid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Close kills the child and stops the restart loop.
func (p *udsPeer) Close() error {
	p.mu.Lock()
	p.stopping = true
	if p.cmd != nil {
		p.cmd.Process.Kill()
	}
	p.mu.Unlock()
	<-p.done
	return os.RemoveAll(p.dir)
}

// runUDSChild is the uds peer's child: net/http serving the handler on the
// unix socket at path. It exits when killed (or, by Pdeathsig, when its
// parent dies).
func runUDSChild(path string) error {
	os.Remove(path) // a dead predecessor's socket
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: newHandler(), ReadHeaderTimeout: 30 * time.Second}
	return srv.Serve(l)
}

// bufferPool is the reverse proxy's pool of 32 KiB copy buffers.
type bufferPool struct{}

var proxyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *proxyBufs.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { proxyBufs.Put(&b) }
