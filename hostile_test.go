//go:build linux

package subproc

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hostile-mod is a module that attacks its own protocol pipes from a
// handler, as only a hostile (or badly broken) module would.
func init() {
	Register("hostile-mod", func(ctx context.Context, env *Env) (http.Handler, error) {
		var keep sync.Mutex
		var kept []*os.File // pipes kept open for the child's life
		mux := http.NewServeMux()
		mux.HandleFunc("GET /pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "inc=%d pid=%d", env.Incarnation, os.Getpid())
		})
		// GET /deafen puts an empty pipe, which nobody ever writes to, in
		// the place of the child's end of the protocol pipe from the
		// parent: the child's reader, once its read under way returns,
		// waits for good, and the parent's writes to the child fail with
		// EPIPE. The child lives on, and its own writes still go through.
		mux.HandleFunc("GET /deafen", func(w http.ResponseWriter, r *http.Request) {
			fd, err := hostileProtocolInFD()
			if err != nil {
				http.Error(w, err.Error(), http.StatusTeapot)
				return
			}
			pr, pw, err := os.Pipe()
			if err != nil {
				http.Error(w, err.Error(), http.StatusTeapot)
				return
			}
			keep.Lock()
			kept = append(kept, pr, pw)
			keep.Unlock()
			if err := syscall.Dup2(int(pr.Fd()), fd); err != nil {
				http.Error(w, err.Error(), http.StatusTeapot)
				return
			}
			fmt.Fprintf(w, "deafened fd %d", fd)
		})
		// GET /drop-aborts puts a filter between the child and its
		// protocol pipe to the parent: every frame goes through but
		// kindAbort, which is dropped. (Installed while the child sends
		// nothing else, but a pong: a frame is one write.)
		mux.HandleFunc("GET /drop-aborts", func(w http.ResponseWriter, r *http.Request) {
			if err := hostileDropAborts(); err != nil {
				http.Error(w, err.Error(), http.StatusTeapot)
				return
			}
			io.WriteString(w, "dropping aborts")
		})
		// GET /tunnel answers 101 and echoes on the hijacked conn.
		mux.HandleFunc("GET /tunnel", func(w http.ResponseWriter, r *http.Request) {
			conn := switchProtocols(w)
			defer conn.Close()
			io.Copy(conn, conn)
		})
		return mux, nil
	})
}

// hostileProtocolInFD finds, in a child, its end of the protocol pipe from
// the parent: the one read end of a pipe among its fds (fd 0 is
// /dev/null once Main has taken the pipes over).
func hostileProtocolInFD() (int, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	var found []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "pipe:") {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(l, "flags:"); ok {
				if flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64); err == nil && flags&3 == syscall.O_RDONLY {
					found = append(found, fd)
				}
			}
		}
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("%d candidates for the protocol pipe's read end: %v", len(found), found)
	}
	return found[0], nil
}

// hostileDropAborts makes, in a child, the frames it writes to the parent
// go through a pipe to a goroutine that passes them on, but kindAbort. The
// goroutine lives as long as the child.
func hostileDropAborts() error {
	fd, err := chaosProtocolFD()
	if err != nil {
		return err
	}
	saved, err := syscall.Dup(fd)
	if err != nil {
		return err
	}
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err != nil {
		return err
	}
	out := os.NewFile(uintptr(saved), "protocol") // non-blocking, as fd
	in := os.NewFile(uintptr(p[0]), "filter")
	if err := syscall.Dup3(p[1], fd, syscall.O_CLOEXEC); err != nil {
		return err
	}
	syscall.Close(p[1])
	go func() {
		hdr := make([]byte, frame.HeaderSize)
		for {
			if _, err := io.ReadFull(in, hdr); err != nil {
				return
			}
			msg := make([]byte, frame.HeaderSize+int(binary.BigEndian.Uint32(hdr)))
			copy(msg, hdr)
			if _, err := io.ReadFull(in, msg[frame.HeaderSize:]); err != nil {
				return
			}
			if hdr[4] == kindAbort {
				continue
			}
			if _, err := out.Write(msg); err != nil {
				return
			}
		}
	}()
	return nil
}

// A child that never ends a tunnel (here its filter drops every kindAbort,
// which its handler's conn sends as it closes) costs the parent no more
// than a record for each tunnel whose client went away. The parent gives
// the tunnel up as the client's connection fails, as it gives up a request
// whose client went away; the handler, which seems to run on, makes the
// child stuck, and the child is replaced. The parent used to keep each
// such stream pending, with its ResponseWriter and buffers, for as long as
// the child lived, and stuck detection did not see it.
func TestHostileChildKeepsTunnels(t *testing.T) {
	var events eventLog
	h := startModule(t, "hostile-mod", Options{
		LogDir:         t.TempDir(), // for the stacks of the stuck child
		StuckTimeout:   time.Second,
		HealthInterval: 100 * time.Millisecond,
		OnEvent:        events.add,
	})
	srv := serve(t, h)
	status, body := fetch(t, srv.URL+"/pid")
	require.Equal(t, http.StatusOK, status, body)
	first := body
	status, body = fetch(t, srv.URL+"/drop-aborts")
	require.Equal(t, http.StatusOK, status, body)
	c := firstChild(h)
	counts := func() (pending, forgotten int) {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.pending), len(c.forgotten)
	}
	const n = 5
	for i := range n {
		upgEchoReset(t, srv, "/tunnel", i)
	}
	waitFor(t, 20*time.Second, "the tunnels given up", func() bool {
		pending, forgotten := counts()
		return pending == 0 && forgotten == n
	})
	waitFor(t, 30*time.Second, "ChildStuck", func() bool { return events.count(ChildStuck, "stuck") == 1 })
	assert.Contains(t, events.first(ChildStuck).Err.Error(), fmt.Sprintf("%d handlers ran on", n))
	awaitStats(t, h, 30*time.Second, "the child replaced, the tunnels' places given back", func(st Stats) bool {
		return st.InFlight == 0 && len(st.Children) == 1 && st.Children[0].State == "running" && st.Children[0].Pid != c.proc.Pid()
	})
	status, body = fetch(t, srv.URL+"/pid")
	require.Equal(t, http.StatusOK, status, body)
	assert.NotEqual(t, first, body, "the stuck child was replaced")
}

// A child whose end of the pipe from the parent is gone, while the child
// lives on (here it put an empty pipe in its place), can take no more
// requests: the parent's writes to it fail for good. The parent must take
// it for broken, a protocol error: kill and restart it. It did not: the
// request whose frame the failed write lost waited for an answer that
// could never come (until its client gave up), and every later request
// spun in ServeHTTP's acquire/open loop, burning a core and deaf to its
// client's going away, until health checks killed the child (here, with
// HealthInterval an hour, for good).
func TestHostileDeafChild(t *testing.T) {
	h := startModule(t, "hostile-mod", Options{HealthInterval: time.Hour})
	srv := serve(t, h)
	// Before the server's Close, which waits for every ServeHTTP: the
	// Handle's shutdown ends requests that would wait on for good.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		h.Shutdown(ctx)
	})

	status, body := fetch(t, srv.URL+"/pid")
	require.Equal(t, http.StatusOK, status, body)
	first := body
	status, body = fetch(t, srv.URL+"/deafen")
	require.Equal(t, http.StatusOK, status, body)

	// The child's reader may still have had a read under way on the real
	// pipe: the next request then reaches it, and the one after finds the
	// pipe without a reader. Each must be answered, by the old child or a
	// new one.
	for i := range 3 {
		var before, after syscall.Rusage
		require.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &before))
		start := time.Now()
		res, body, err := fetchErr(srv.URL+"/pid", 3*time.Second)
		elapsed := time.Since(start)
		require.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &after))
		cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
		t.Logf("request %d after the child went deaf: %v of wall time, %v of the parent's CPU: %v %q", i, elapsed.Round(time.Millisecond), cpu.Round(time.Millisecond), err, body)
		if !assert.NoError(t, err, "request %d after the child went deaf", i) {
			continue
		}
		assert.Equal(t, http.StatusOK, res.StatusCode, body)
	}
	res, body, err := fetchErr(srv.URL+"/pid", 3*time.Second)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	require.NotEqual(t, first, body, "the deaf child was replaced")
	awaitStats(t, h, 10*time.Second, "the deaf child's end recorded as a protocol error", func(st Stats) bool {
		return strings.Contains(st.LastExit, "protocol error")
	})
}
