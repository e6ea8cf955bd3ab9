//go:build linux

package subproc

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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
