package main

import (
	"bytes"
	"errors"
	"io"
	"log"
	"net/http"
	"net/rpc"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
)

// The goplugin peer: hashicorp/go-plugin with its net/rpc protocol (not
// gRPC). Each HTTP request is one unary RPC, Plugin.Serve, whose argument
// carries the method, URL, header and whole body, and whose reply carries
// the status, header and whole body. The child runs the handler against a
// ResponseWriter that buffers the response. So request and response bodies
// are buffered whole on both sides, and a flushed stream reaches the client
// only when it has ended: the /stream workload is not run for this peer
// (and net/rpc's gob encoding refuses a message of 1 GiB or more anyway).
//
// go-plugin does not restart a plugin whose process died. The peer runs a
// watcher goroutine that, when the plugin's process has exited
// (Client.Exited), kills the old Client (cleanup) and starts a new one,
// retrying every 100 ms until one starts. The watcher checks Exited every
// 50 ms, and at once (then every millisecond for up to a second) when an
// RPC fails, since a dead plugin shows first as failed RPCs. Requests that
// arrive while no plugin runs get 503, and a request whose RPC fails gets
// 502 Bad Gateway.

// goPluginHandshake is the handshake both sides must agree on.
var goPluginHandshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "BENCH_PLUGIN",
	MagicCookieValue: "http",
}

// RPCRequest is the argument of Plugin.Serve.
type RPCRequest struct {
	Method     string
	RequestURI string
	Host       string
	Header     http.Header
	Body       []byte
}

// RPCResponse is the reply of Plugin.Serve.
type RPCResponse struct {
	Status int
	Header http.Header
	Body   []byte
}

// httpPlugin is the go-plugin Plugin of both sides (net/rpc flavour).
type httpPlugin struct{ handler http.Handler }

// Server returns the child's RPC receiver.
func (p *httpPlugin) Server(*plugin.MuxBroker) (any, error) {
	return &RPCServer{handler: p.handler}, nil
}

// Client returns the parent's stub.
func (p *httpPlugin) Client(_ *plugin.MuxBroker, c *rpc.Client) (any, error) {
	return &rpcClient{c}, nil
}

// RPCServer runs the handler for each call in the child.
type RPCServer struct{ handler http.Handler }

// Serve runs the handler on req and returns the buffered response.
func (s *RPCServer) Serve(req RPCRequest, resp *RPCResponse) error {
	r, err := http.NewRequest(req.Method, "http://"+req.Host+req.RequestURI, bytes.NewReader(req.Body))
	if err != nil {
		return err
	}
	r.RequestURI = req.RequestURI
	r.Header = req.Header
	r.Host = req.Host
	w := &bufferedWriter{header: make(http.Header)}
	s.handler.ServeHTTP(w, r)
	if w.status == 0 {
		w.status = http.StatusOK
	}
	resp.Status, resp.Header, resp.Body = w.status, w.header, w.body.Bytes()
	return nil
}

// bufferedWriter is the child's http.ResponseWriter: it keeps the whole
// response. Flush is a no-op.
type bufferedWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (w *bufferedWriter) Header() http.Header { return w.header }
func (w *bufferedWriter) Flush()              {}
func (w *bufferedWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}
func (w *bufferedWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.body.Write(p)
}

// rpcClient is the parent's stub for Plugin.Serve.
type rpcClient struct{ c *rpc.Client }

func (c *rpcClient) serve(req *RPCRequest) (*RPCResponse, error) {
	var resp RPCResponse
	err := c.c.Call("Plugin.Serve", req, &resp)
	return &resp, err
}

// runGoPluginChild is the goplugin peer's child.
func runGoPluginChild() {
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: goPluginHandshake,
		Plugins:         map[string]plugin.Plugin{"http": &httpPlugin{handler: newHandler()}},
		Logger:          hclog.New(&hclog.LoggerOptions{Name: "goplugin-child", Output: os.Stderr, Level: hclog.Warn}),
	})
}

// goPluginPeer is the parent's side: the current plugin and its watcher.
type goPluginPeer struct {
	logger hclog.Logger

	mu      sync.Mutex
	client  *plugin.Client
	stub    *rpcClient
	pid     int
	closing bool

	kick chan struct{} // an RPC failed: check the plugin now
	stop chan struct{}
	done chan struct{}
}

// startGoPlugin starts the first plugin and its watcher.
func startGoPlugin() (*goPluginPeer, error) {
	p := &goPluginPeer{
		logger: hclog.New(&hclog.LoggerOptions{Name: "goplugin", Output: os.Stderr, Level: hclog.Warn}),
		kick:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if err := p.launch(); err != nil {
		close(p.done)
		return nil, err
	}
	go p.watch()
	return p, nil
}

// launch starts a plugin process and makes it the current one.
func (p *goPluginPeer) launch() error {
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), envRole+"=goplugin-child")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  goPluginHandshake,
		Plugins:          map[string]plugin.Plugin{"http": &httpPlugin{}},
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolNetRPC},
		Logger:           p.logger,
		SyncStderr:       os.Stderr,
	})
	proto, err := client.Client()
	if err != nil {
		client.Kill()
		return err
	}
	raw, err := proto.Dispense("http")
	if err != nil {
		client.Kill()
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		client.Kill()
		return errors.New("closing")
	}
	p.client, p.stub, p.pid = client, raw.(*rpcClient), cmd.Process.Pid
	return nil
}

// watch restarts the plugin whenever its process has exited.
func (p *goPluginPeer) watch() {
	defer close(p.done)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		kicked := false
		select {
		case <-p.stop:
			return
		case <-tick.C:
		case <-p.kick:
			kicked = true
		}
		p.mu.Lock()
		client := p.client
		p.mu.Unlock()
		exited := client.Exited()
		// A failed RPC usually means the process is dying; cmd.Wait in
		// go-plugin has not necessarily returned yet.
		for deadline := time.Now().Add(time.Second); kicked && !exited && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
			exited = client.Exited()
		}
		if !exited {
			continue
		}
		p.mu.Lock()
		p.stub, p.pid = nil, 0
		p.mu.Unlock()
		go client.Kill() // cleanup of the dead plugin's goroutines and socket, off the restart's path
		for {
			err := p.launch()
			if err == nil {
				break
			}
			log.Printf("goplugin: restarting plugin: %v", err)
			select {
			case <-p.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
}

// ServeHTTP forwards the request as one RPC.
func (p *goPluginPeer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	stub := p.stub
	p.mu.Unlock()
	if stub == nil {
		w.Header().Set("Retry-After", "1")
		http.Error(w, "plugin restarting", http.StatusServiceUnavailable)
		return
	}
	var body []byte
	var err error
	if r.ContentLength > 0 {
		body = make([]byte, r.ContentLength)
		_, err = io.ReadFull(r.Body, body)
	} else {
		body, err = io.ReadAll(r.Body)
	}
	if err != nil {
		http.Error(w, "reading request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	resp, err := stub.serve(&RPCRequest{
		Method:     r.Method,
		RequestURI: r.URL.RequestURI(),
		Host:       r.Host,
		Header:     r.Header,
		Body:       body,
	})
	if err != nil {
		select {
		case p.kick <- struct{}{}:
		default:
		}
		http.Error(w, "plugin: "+err.Error(), http.StatusBadGateway)
		return
	}
	h := w.Header()
	for k, v := range resp.Header {
		h[k] = v
	}
	h.Set("Content-Length", strconv.Itoa(len(resp.Body)))
	w.WriteHeader(resp.Status)
	w.Write(resp.Body)
}

// ChildPid returns the current plugin process's pid.
func (p *goPluginPeer) ChildPid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Close stops the watcher and kills the plugin.
func (p *goPluginPeer) Close() error {
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client != nil {
		p.client.Kill()
	}
	return nil
}
