package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc"
)

// A peer is one way of serving the handler, as set up in the server
// process.
type peer interface {
	http.Handler
	// ChildPid returns the process id of the child serving requests now, or
	// 0 if there is none (inproc, or between a child's death and its
	// replacement).
	ChildPid() int
	// Close stops the peer and its child.
	Close() error
}

// startPeer sets up the named peer in the server process.
func startPeer(ctx context.Context, name string) (peer, error) {
	switch name {
	case "inproc":
		return inprocPeer{newHandler()}, nil
	case "uds":
		return startUDS()
	case "goplugin":
		return startGoPlugin()
	case "pipe":
		return startPipe()
	case "subproc":
		h, err := subproc.Start(ctx, "bench", subproc.Options{})
		if err != nil {
			return nil, err
		}
		return subprocPeer{h}, nil
	}
	return nil, fmt.Errorf("unknown peer %q", name)
}

// inprocPeer serves the handler in the server process: the ceiling.
type inprocPeer struct{ http.Handler }

func (inprocPeer) ChildPid() int { return 0 }
func (inprocPeer) Close() error  { return nil }

// subprocPeer forwards every request to the library's Handle, started
// with default Options.
type subprocPeer struct{ *subproc.Handle }

func (p subprocPeer) ChildPid() int { return p.Stats().Pid }

// runServer is the server process of one peer. It listens on an ephemeral
// loopback TCP port, prints the address as its first line on stdout once
// the peer is ready, and serves until SIGTERM or SIGINT. Besides the
// peer's routes it answers GET /_pid itself, never forwarded, with the
// child's process id (0 if none), so the driver can kill the child.
func runServer(name string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	p, err := startPeer(ctx, name)
	if err != nil {
		return fmt.Errorf("starting peer %s: %w", name, err)
	}
	defer p.Close()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /_pid", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(strconv.Itoa(p.ChildPid())))
	})
	mux.Handle("/", p)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          log.New(os.Stderr, "server: ", log.LstdFlags),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	fmt.Println(l.Addr().String())

	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}
