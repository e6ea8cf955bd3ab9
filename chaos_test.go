package subproc

// The chaos suite: faults and load against real children.
//
// By default (go test ./...) each scenario runs a short version, which is
// part of CI. The full suite takes several minutes:
//
//	go test -run Chaos -v -chaos .
//
// (add -race to run it under the race detector, which slows it down about
// fourfold and inflates every memory figure). The scenarios:
//
//   - TestChaosKillStorm: concurrent clients send small GETs, 1 MiB POST
//     echoes and streams of up to 2 MiB while the child is SIGKILLed every
//     200–800 ms.
//   - TestChaosHangStorm: the child freezes, by SIGSTOP or by starving its
//     Go runtime (see chaosHang), and the health checks must replace it.
//   - TestChaosGarbage: bad input for the parent's reader, through the
//     in-memory seam (testChild) and from a real child writing onto its
//     protocol pipe. FuzzReadFrames fuzzes the same reader; its seed corpus
//     is in testdata/fuzz/FuzzReadFrames.
//   - TestChaosSlowClients: streamed responses to clients that read one byte
//     every 100 ms over sockets with small buffers, or disconnect mid-stream.
//   - TestChaosRestartChurn: restarts in a row by SIGKILL, crash on init
//     and exit 0.
//   - TestChaosParentDeath: a parent with modules mid-request is SIGKILLed.
//   - TestChaosStartFailures: modules whose init exits, freezes, starves its
//     runtime or writes garbage onto the protocol.
//
// Each scenario logs a table of figures:
//
//   - requests sent: HTTP requests the scenario's clients made;
//   - answered 2xx: complete, verified answers (every body is checked:
//     small bodies carry a CRC of the request id, echoes and streams are
//     compared byte for byte and carry a SHA-256 trailer);
//   - answered 5xx: honest failures, 502 (the child died before answering)
//     and 503 (with Retry-After: no child came back within RestartWait);
//   - aborted: the connection or the body was cut: the honest failure of a
//     response that had started;
//   - hung: requests that had not ended when their deadline passed (must
//     be 0);
//   - wrong bodies or statuses: a 2xx whose body or trailer does not match
//     what was asked, or a status that is neither (must be 0);
//   - restarts: children the handle started after the first (Stats);
//   - leaked goroutines, fds, child processes: the parent's count after the
//     scenario, its handles shut down and its connections closed, minus the
//     count before (must be ≤ 0);
//   - parent heap before / after: live heap after a GC (runtime.MemStats).
//
// Scenario-specific figures follow the table.

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

var chaosFull = flag.Bool("chaos", false, "run the full chaos suite (minutes) instead of its short version")

// chaosN returns short, or full under -chaos.
func chaosN[T any](short, full T) T {
	if *chaosFull {
		return full
	}
	return short
}

// chaosDo sends one request of the storm's mix and classifies its outcome
// in f. Its id makes its answer unique.
func chaosDo(t *testing.T, client *http.Client, base string, id uint64, r *rand.Rand, f *chaosFigures, deadline time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	var req *http.Request
	var want []byte
	var wantSum, what string
	switch k := r.IntN(10); {
	case k < 6:
		what = "small"
		req, _ = http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/small?id=%d", base, id), nil)
		want = []byte(chaosSmallBody(strconv.FormatUint(id, 10)))
	case k < 8:
		what = "echo"
		want = chaosStreamBytes(id, 1<<20)
		wantSum = chaosSum(want)
		req, _ = http.NewRequestWithContext(ctx, "POST", fmt.Sprintf("%s/echo?id=%d", base, id), bytes.NewReader(want))
	default:
		what = "stream"
		n := 64<<10 + r.IntN(2<<20)
		want = chaosStreamBytes(id, n)
		wantSum = chaosSum(want)
		req, _ = http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/stream?id=%d&bytes=%d", base, id, n), nil)
	}
	f.sent.Add(1)
	res, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			f.hung.Add(1)
			t.Logf("%s %d: no answer within %v: %v", what, id, deadline, err)
		} else {
			f.aborted.Add(1)
		}
		return
	}
	defer res.Body.Close()
	b, rerr := io.ReadAll(res.Body)
	switch {
	case rerr != nil && ctx.Err() != nil:
		f.hung.Add(1)
		t.Logf("%s %d: body not complete within %v: %v", what, id, deadline, rerr)
	case res.StatusCode == http.StatusBadGateway:
		f.s502.Add(1)
	case res.StatusCode == http.StatusServiceUnavailable:
		f.s503.Add(1)
		if res.Header.Get("Retry-After") == "" {
			f.wrong.Add(1)
			t.Logf("%s %d: 503 without Retry-After: %q", what, id, b)
		}
	case res.StatusCode != http.StatusOK:
		f.wrong.Add(1)
		t.Logf("%s %d: status %d: %q", what, id, res.StatusCode, b)
	case rerr != nil:
		f.aborted.Add(1)
	case !bytes.Equal(b, want) || res.Trailer.Get("X-Sum") != wantSum:
		f.wrong.Add(1)
		t.Logf("%s %d: wrong answer: %d bytes, want %d; X-Sum %q, want %q; header %v", what, id, len(b), len(want), res.Trailer.Get("X-Sum"), wantSum, res.Header)
	default:
		f.ok.Add(1)
	}
}

// chaosTraffic runs clients that send the storm's mix until stop is closed.
func chaosTraffic(t *testing.T, clients int, client *http.Client, base string, f *chaosFigures, stop <-chan struct{}) (wait func()) {
	var wg sync.WaitGroup
	var seq atomic.Uint64
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-stop:
					return
				default:
				}
				chaosDo(t, client, base, seq.Add(1), r, f, 60*time.Second)
			}
		}()
	}
	return wg.Wait
}

// While the child is SIGKILLed every 200–800 ms, concurrent requests get
// their own, complete answer or an honest failure, never another request's
// bytes, and never hang; the module serves again after each kill.
func TestChaosKillStorm(t *testing.T) {
	clients := chaosN(16, 64)
	dur := chaosN(5*time.Second, 60*time.Second)
	f := &chaosFigures{before: chaosSnap()}
	// Children killed every 200–800 ms die young: the module would back
	// off (see Options.MaxRestartDelay), and the storm would be a few
	// kills. A delay capped at 1ms keeps the storm going.
	h, stopHandle := chaosStart(t, "chaos", chaosConfig{}, Options{MaxRestartDelay: time.Millisecond})
	srv := httptest.NewServer(h)
	client := chaosClient(clients)
	restarts0 := h.Stats().Restarts

	stop := make(chan struct{})
	wait := chaosTraffic(t, clients, client, srv.URL, f, stop)
	kills := 0
	var slowest time.Duration
	for end := time.Now().Add(dur); time.Now().Before(end); {
		time.Sleep(200*time.Millisecond + rand.N(600*time.Millisecond)) // the pace of the kills
		pid := chaosPid(t, h)
		killed := time.Now()
		require.NoError(t, syscall.Kill(pid, syscall.SIGKILL), "kill %d", pid)
		kills++
		awaitStats(t, h, 30*time.Second, fmt.Sprintf("a new child after kill %d", kills), chaosRunningOtherThan(pid))
		slowest = max(slowest, time.Since(killed))
		err := syscall.Kill(pid, 0)
		assert.ErrorIs(t, err, syscall.ESRCH, "killed child %d not reaped once its successor serves", pid)
	}
	close(stop)
	wait()
	// The module serves after the storm.
	if d, err := h.HealthCheck(context.Background()); err != nil {
		t.Errorf("health check after the storm: %v", err)
	} else {
		f.addf("health check after the storm: %v", d)
	}
	chaosDo(t, client, srv.URL, 1<<62, rand.New(rand.NewPCG(1, 1)), f, 30*time.Second)
	f.restarts = h.Stats().Restarts - restarts0
	client.CloseIdleConnections()
	srv.Close()
	stopHandle()
	f.settle(10 * time.Second)
	f.addf("clients %d for %v, kills %d, slowest recovery (kill to new child serving) %v", clients, dur, kills, slowest.Round(time.Millisecond))
	f.report(t, "kill storm")
	f.check(t, 16<<20)
	assert.NotZero(t, f.ok.Load(), "no request succeeded")
	assert.GreaterOrEqual(t, f.restarts, kills, "%d restarts for %d kills", f.restarts, kills)
}

// A child that freezes — stopped by SIGSTOP, or with its Go runtime starved
// so that no goroutine runs — is found by the health checks, killed,
// reaped and replaced; requests sent meanwhile are answered by the next
// child or fail honestly.
func TestChaosHangStorm(t *testing.T) {
	hangs := chaosN(4, 30)
	f := &chaosFigures{before: chaosSnap()}
	h, stopHandle := chaosStart(t, "chaos", chaosConfig{}, Options{
		HealthInterval: 100 * time.Millisecond,
		HealthTimeout:  500 * time.Millisecond,
		HealthFailures: 3,
	})
	srv := httptest.NewServer(h)
	client := chaosClient(8)
	restarts0 := h.Stats().Restarts
	stop := make(chan struct{})
	wait := chaosTraffic(t, 4, client, srv.URL, f, stop)

	var detect []time.Duration
	byHealth := 0
	for i := range hangs {
		how := []string{"stop", "starve"}[rand.N(2)]
		if i < 2 {
			how = []string{"stop", "starve"}[i] // both kinds at least once
		}
		pid := chaosPid(t, h)
		start := time.Now()
		hung := make(chan struct{})
		go func() {
			defer close(hung)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/hang?how="+how, nil)
			f.sent.Add(1)
			res, err := client.Do(req)
			f.count502(t, ctx, "GET /hang?how="+how, res, err)
		}()
		awaitStats(t, h, 60*time.Second, fmt.Sprintf("hang %d (%s): child %d replaced", i, how, pid), chaosRunningOtherThan(pid))
		detect = append(detect, time.Since(start))
		assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "hang %d (%s): frozen child %d not reaped once replaced", i, how, pid)
		if st := h.Stats(); strings.Contains(st.LastExit, "health") {
			byHealth++
		} else {
			t.Errorf("hang %d (%s): LastExit %q, want the failed health checks", i, how, st.LastExit)
		}
		<-hung
	}
	close(stop)
	wait()
	f.restarts = h.Stats().Restarts - restarts0
	client.CloseIdleConnections()
	srv.Close()
	stopHandle()
	f.settle(10 * time.Second)
	lo, hi := detect[0], detect[0]
	for _, d := range detect {
		lo, hi = min(lo, d), max(hi, d)
	}
	f.addf("hangs %d (SIGSTOP or starved runtime), found by health checks %d; hang to new child serving: %v–%v (interval 100ms, timeout 500ms, 3 failures)",
		hangs, byHealth, lo.Round(time.Millisecond), hi.Round(time.Millisecond))
	f.report(t, "hang storm")
	f.check(t, 16<<20)
}

// garbageChild returns a parent-side child (message_test.go's testChild)
// with requests 1 and 2 pending, whose pipe from the child carries input.
func garbageChild(input []byte) (*child, *stream, *stream) {
	c := testChild(input)
	c.nextID = 2
	s1, s2 := newStream(1, window), newStream(2, window)
	c.pending[1], c.pending[2] = s1, s2
	return c, s1, s2
}

// The parent's reader, fed every kind of bad input after a valid start of
// request 2's response, ends with an error, never panics, never holds more
// than a window of a stream, and never gives request 2 anything but what
// the child sent for it. (message_test.go's TestReadLoopRejectsBadInput
// covers each malformed message on its own; FuzzReadFrames, random input.)
// A storm of requests that time out as their handlers return, at the
// deadline they share, leaves no request counted as given up with a
// handler running on: such an entry would count as stuck for good, and
// make StuckTimeout recycle a healthy child. (The child's end could
// come in between the parent's lookup of the stream and its give-up.)
func TestChaosDeadlineStorm(t *testing.T) {
	h := startModule(t, "fail-mod", failOpts(t, failConfig{}, Options{RequestTimeout: 5 * time.Millisecond, HealthInterval: time.Hour}))
	srv := serve(t, h)
	var next atomic.Int64
	n := chaosN[int64](500, 12000)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for next.Add(1) <= n {
				if res, err := srv.Client().Get(srv.URL + "/stream"); err == nil {
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
			}
		})
	}
	wg.Wait()
	waitFor(t, 20*time.Second, "no request given up with its handler running", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, c := range h.kids {
			if _, n := c.givenUpSince(); n > 0 {
				return false
			}
		}
		return true
	})
}

func TestChaosGarbage(t *testing.T) {
	t.Run("seam", chaosGarbageSeam)
	t.Run("child", chaosGarbageChild)
}

func chaosGarbageSeam(t *testing.T) {
	// All frames come from one encoder, as from a child: the handshake and
	// the prefix, which every input starts with, carry the gob types of the
	// ready message and of a response head.
	enc := newEncoder()
	frames := func(fs ...outFrame) []byte {
		var b bytes.Buffer
		w := frame.NewWriter(&b, 1024)
		for _, f := range fs {
			if f.msg != nil {
				p, err := enc.encode(f.msg)
				require.NoError(t, err)
				f.data = append([]byte(nil), p...)
			}
			w.WriteFrame(f.kind, f.flags, f.id, f.data)
		}
		w.Flush()
		return b.Bytes()
	}
	var preamble bytes.Buffer
	frame.WritePreamble(&preamble, protocolVersion)
	head := &responseHead{Status: 200, Header: http.Header{"X": {"two"}}}
	prefix := append(preamble.Bytes(), frames(outFrame{kind: kindReady, msg: &ready{Pid: 1}}, outFrame{kind: kindResponse, id: 2, msg: head}, outFrame{kind: kindData, id: 2, data: []byte("two")})...)
	hdr := func(n uint32, kind uint8, id uint64) []byte {
		b := make([]byte, frame.HeaderSize)
		b[0], b[1], b[2], b[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
		b[4] = kind
		for i := range 8 {
			b[8+i] = byte(id >> (56 - 8*i))
		}
		return b
	}
	data1 := frames(outFrame{kind: kindData, id: 1, data: make([]byte, chunkSize)})
	info1 := frames(outFrame{kind: kindResponse, id: 1, msg: &responseHead{Status: 103}})
	// A stream of valid frames for both requests, for truncation.
	whole := frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindData, id: 1, data: []byte("one")},
		outFrame{kind: kindWindow, id: 1, data: []byte{0, 0, 1, 0}}, outFrame{kind: kindEnd, id: 1, msg: &bodyEnd{Trailer: http.Header{"T": {"v"}}}})

	type tcase struct {
		name     string
		input    []byte
		protocol bool // the error must be a protocol error
	}
	var cases []tcase
	add := func(name string, protocol bool, garbage ...[]byte) {
		cases = append(cases, tcase{name: name, input: bytes.Join(append([][]byte{prefix}, garbage...), nil), protocol: protocol})
	}
	for n := 1; n < len(whole); n++ {
		add(fmt.Sprintf("truncated at %d of %d", n, len(whole)), false, whole[:n])
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		g := make([]byte, 1+r.IntN(200))
		for j := range g {
			g[j] = byte(r.Uint32())
		}
		if i%3 == 0 {
			copy(g, hdr(uint32(r.IntN(64)), uint8(1+r.IntN(13)), []uint64{0, 1, 3}[r.IntN(3)])) // a plausible header, not for request 2
		}
		add(fmt.Sprintf("random %d", i), false, g)
	}
	add("unknown request id", true, frames(outFrame{kind: kindData, id: 3, data: []byte("x")}))
	add("finished request", true, frames(outFrame{kind: kindResponse, id: 1, msg: head}, outFrame{kind: kindEnd, id: 1}, outFrame{kind: kindResponse, id: 1, msg: head}))
	// A new incarnation has a new pipe and a new request table; a message
	// that an earlier incarnation would have sent, for a request id this
	// one has not issued, is a request that was never sent.
	add("old incarnation's request id", true, frames(outFrame{kind: kindResponse, id: 40, msg: head}))
	add("frame over the limit", true, hdr(frame.MaxPayload+1, kindResponse, 1))
	add("frame at the limit, truncated", false, hdr(frame.MaxPayload, kindResponse, 1), []byte{1, 2, 3})
	add("chunk over its limit", true, hdr(chunkSize+1, kindData, 2), make([]byte, chunkSize+1))
	add("request 2's head again", true, frames(outFrame{kind: kindResponse, id: 2, msg: head}))
	add("map claiming 4e9 entries", true, frames(outFrame{kind: kindResponse, id: 1, data: hugeMapCount(t, enc, &responseHead{Status: 200, Header: http.Header{"A": {"b"}}})}))
	// Input that never ends is cut at 16 MiB: a protocol error, rather
	// than the end of the input, shows the reader gave up before.
	endless := func(name string, p ...[]byte) {
		unit := bytes.Join(p, nil)
		add(name, true, bytes.Repeat(unit, (16<<20)/len(unit)))
	}
	endless("a stream that never ends", frames(outFrame{kind: kindResponse, id: 1, msg: head}), data1, data1, data1, data1, data1, data1, data1, data1, data1)
	endless("1xx heads that never end", info1)
	endless("window updates that never end", frames(outFrame{kind: kindWindow, id: 1, data: []byte{0x10, 0, 0, 0}}))

	for _, tt := range cases {
		c, s1, s2 := garbageChild(tt.input)
		go c.waitLoop()
		c.readLoop() // fails the pending requests when it ends
		c.proc.Kill()
		<-c.exited
		require.NoError(t, <-c.ready, "%s: handshake", tt.name)
		err := c.doneErr()
		var pe *protocolError
		if tt.protocol && !errors.As(err, &pe) {
			t.Errorf("%s: the reader ended with %v, want a protocol error", tt.name, err)
		}
		for _, s := range []*stream{s1, s2} {
			s.mu.Lock()
			q := s.queued
			s.mu.Unlock()
			assert.LessOrEqual(t, q, window, "%s: request %d holds %d bytes, over the window", tt.name, s.id, q)
		}
		// Request 2 gets its head and "two", then fails.
		var got []string
		for {
			ev, err := s2.next(nil)
			if err != nil {
				break
			}
			switch ev.kind {
			case kindResponse:
				got = append(got, fmt.Sprintf("head %d %v", ev.head.Status, ev.head.Header))
			case kindData:
				got = append(got, "data "+string(ev.data()))
				ev.release()
			default:
				got = append(got, fmt.Sprintf("kind %d", ev.kind))
			}
		}
		want := []string{"head 200 map[X:[two]]", "data two"}
		assert.Equal(t, fmt.Sprint(want), fmt.Sprint(got), "%s: request 2 got %q, want %q then a failure", tt.name, got, want)
		s1.abandon()
		c.mu.Lock()
		assert.Len(t, c.pending, 0, "%s: %d requests still pending after the failure", tt.name, len(c.pending))
		c.mu.Unlock()
	}
	t.Logf("%d bad inputs: each ended the reader with an error, no panic, request 2 intact", len(cases))
}

func chaosGarbageChild(t *testing.T) {
	rounds := chaosN(6, 40)
	f := &chaosFigures{before: chaosSnap()}
	dir := t.TempDir()
	// Each round's child dies young: a delay capped at 1ms keeps the
	// module from backing off (see Options.MaxRestartDelay) between rounds.
	h, stopHandle := chaosStart(t, "chaos", chaosConfig{Dir: dir}, Options{HealthInterval: 200 * time.Millisecond, HealthTimeout: time.Second, MaxRestartDelay: time.Millisecond})
	srv := httptest.NewServer(h)
	client := chaosClient(8)
	restarts0 := h.Stats().Restarts
	stop := make(chan struct{})
	wait := chaosTraffic(t, 4, client, srv.URL, f, stop)
	kinds := []string{"random", "too-large", "unknown-id", "close"}
	seen := map[string]int{}
	for i := range rounds {
		how := kinds[i%len(kinds)]
		pid := chaosPid(t, h)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/garbage?how=%s&round=%d", srv.URL, how, i), nil)
			// A connection of its own: net/http's client would retry a GET
			// whose reused connection closed without an answer.
			once := &http.Transport{DisableKeepAlives: true}
			defer once.CloseIdleConnections()
			res, err := (&http.Client{Transport: once}).Do(req)
			if err == nil {
				if res.StatusCode == http.StatusTeapot {
					b, _ := io.ReadAll(res.Body)
					t.Errorf("the module could not write garbage: %s", b)
				}
				res.Body.Close()
			}
		}()
		awaitStats(t, h, 60*time.Second, fmt.Sprintf("garbage %q: child %d replaced", how, pid), chaosRunningOtherThan(pid))
		assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "garbage %q: child %d not reaped once replaced", how, pid)
		st := h.Stats()
		seen[how+": "+st.LastExit]++
		if how != "close" && !strings.Contains(st.LastExit, "protocol error") {
			t.Errorf("garbage %q: LastExit %q, want a protocol error", how, st.LastExit)
		}
	}
	close(stop)
	wait()
	f.restarts = h.Stats().Restarts - restarts0
	client.CloseIdleConnections()
	srv.Close()
	stopHandle()
	f.settle(10 * time.Second)
	for k, n := range seen {
		f.addf("%dx %s", n, k)
	}
	// A request whose handler ran is never given to another child.
	b, err := os.ReadFile(filepath.Join(dir, "garbage"))
	require.NoError(t, err)
	runs := map[string][]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		round, pid, _ := strings.Cut(l, " ")
		runs[round] = append(runs[round], pid)
	}
	twice := 0
	for round, pids := range runs {
		if len(pids) > 1 {
			twice++
			t.Errorf("the request of round %s ran in %d children: pids %v", round, len(pids), pids)
		}
	}
	f.addf("garbage requests run: %d of %d rounds, %d of them more than once", len(runs), rounds, twice)
	f.report(t, "garbage from a real child")
	f.check(t, 16<<20)
}

// Many streamed responses to clients that read one byte every 100 ms, or
// disconnect mid-stream: memory stays bounded by the window per stream,
// small requests keep their latency, every disconnect cancels its handler.
func TestChaosSlowClients(t *testing.T) {
	n := chaosN(40, 1000)
	dur := chaosN(3*time.Second, 20*time.Second)
	f := &chaosFigures{before: chaosSnap()}
	h, stopHandle := chaosStart(t, "chaos", chaosConfig{}, Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = smallBufListener{ln, 4096}
	srv.Start()
	client := chaosClient(4)
	childPid := h.Stats().Pid

	smallGets := func(lat *chaosLatencies, stop <-chan struct{}, max int) {
		for i := 0; i < max; i++ {
			select {
			case <-stop:
				return
			default:
			}
			start := time.Now()
			f.sent.Add(1)
			id := strconv.Itoa(i)
			res, err := client.Get(srv.URL + "/small?id=" + id)
			if err != nil {
				f.aborted.Add(1)
				continue
			}
			b, err := io.ReadAll(res.Body)
			res.Body.Close()
			switch {
			case err != nil:
				f.aborted.Add(1)
			case res.StatusCode != 200 || string(b) != chaosSmallBody(id):
				f.wrong.Add(1)
			default:
				f.ok.Add(1)
				lat.add(time.Since(start))
			}
			time.Sleep(5 * time.Millisecond) // the pace of the probe
		}
	}
	var before, during chaosLatencies
	smallGets(&before, nil, 200)
	heap0 := chaosSnap().heap
	rss0 := chaosRSS(childPid)

	// The slow clients.
	const bodySize = 64 << 20
	stopSlow := make(chan struct{})
	var slowWG sync.WaitGroup
	var midDisconnects, readBytes atomic.Int64
	for i := range n {
		slowWG.Add(1)
		go func() {
			defer slowWG.Done()
			f.sent.Add(1)
			d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
				return serr
			}}
			conn, err := d.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Errorf("dial: %v", err)
				return
			}
			defer conn.Close()
			fmt.Fprintf(conn, "GET /slow?bytes=%d HTTP/1.1\r\nHost: slow\r\n\r\n", bodySize)
			// Half the clients go away at a random time mid-stream.
			var leave <-chan time.Time
			if i%2 == 0 {
				leave = time.After(time.Duration(float64(dur) * (0.2 + 0.6*rand.Float64())))
			}
			tick := time.NewTicker(100 * time.Millisecond) // the client's pace
			defer tick.Stop()
			var b [1]byte
			for {
				select {
				case <-stopSlow:
					f.aborted.Add(1) // the client ended it
					return
				case <-leave:
					midDisconnects.Add(1)
					f.aborted.Add(1)
					return
				case <-tick.C:
				}
				if _, err := conn.Read(b[:]); err != nil {
					t.Errorf("slow client: %v", err)
					return
				}
				readBytes.Add(1)
			}
		}()
	}
	// Wait for every handler to run.
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := chaosGetCounts(client, srv.URL)
		if err == nil && c.Started >= int64(n) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s only %+v of %d slow handlers started (%v)", c, n, err)
		}
		time.Sleep(50 * time.Millisecond) // the child's progress: poll
	}
	// Sample memory, and probe latency, while the clients read.
	var heapPeak, rssPeak uint64
	stopProbe := make(chan struct{})
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		smallGets(&during, stopProbe, 1<<30)
	}()
	for end := time.Now().Add(dur); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		heapPeak = max(heapPeak, ms.HeapAlloc)
		rssPeak = max(rssPeak, chaosRSS(childPid))
	}
	close(stopProbe)
	<-probeDone
	// The clients that left mid-stream had their handlers canceled.
	mid := midDisconnects.Load()
	var atEnd chaosCounts
	deadline = time.Now().Add(30 * time.Second)
	for {
		atEnd, err = chaosGetCounts(client, srv.URL)
		if err == nil && atEnd.Canceled >= mid || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // the child's progress: poll
	}
	assert.GreaterOrEqual(t, atEnd.Canceled, mid, "%d clients left mid-stream but only %d handlers were canceled", mid, atEnd.Canceled)
	close(stopSlow)
	slowWG.Wait()
	var final chaosCounts
	deadline = time.Now().Add(60 * time.Second)
	for {
		final, err = chaosGetCounts(client, srv.URL)
		if err == nil && final.Active == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // the child's progress: poll
	}
	assert.Zero(t, final.Active, "after every client left: %+v, want all %d handlers canceled", final, n)
	assert.Equal(t, int64(n), final.Canceled, "after every client left: %+v, want all %d handlers canceled", final, n)
	client.CloseIdleConnections()
	srv.Close()
	stopHandle()
	f.settle(10 * time.Second)

	perStream := uint64(window + 2*chunkSize)
	f.addf("slow streams %d (%d left mid-stream), %d bytes read by them in %v", n, mid, readBytes.Load(), dur)
	f.addf("handlers canceled: %d of %d left mid-stream at once; %d of %d in all", atEnd.Canceled, mid, final.Canceled, n)
	f.addf("parent heap: %s idle, peak %s with the streams (%.0f KiB per stream; window %d KiB)",
		mib(heap0), mib(heapPeak), float64(heapPeak-min(heap0, heapPeak))/float64(n)/1024, window>>10)
	f.addf("child RSS: %s idle, peak %s (%.0f KiB per stream)", mib(rss0), mib(rssPeak), float64(rssPeak-min(rss0, rssPeak))/float64(n)/1024)
	f.addf("small GET latency: before %v; during %v", &before, &during)
	f.report(t, "slow and vanishing clients")
	f.check(t, 16<<20)
	assert.LessOrEqual(t, heapPeak, heap0+uint64(n)*perStream+32<<20, "parent heap peaked at %s, over %s idle + %d streams × %d KiB", mib(heapPeak), mib(heap0), n, perStream>>10)
	rssBound := uint64(n)*perStream + 64<<20
	if raceEnabled {
		rssBound *= 4 // shadow memory
	}
	assert.LessOrEqual(t, rssPeak, rss0+rssBound, "child RSS peaked at %s, over %s idle + %s", mib(rssPeak), mib(rss0), mib(rssBound))
	p50b, p50d := before.pct(0.5), during.pct(0.5)
	assert.LessOrEqual(t, p50d, 10*p50b+50*time.Millisecond, "small GETs took %v (p50) during the slow streams, %v before", p50d, p50b)
}

// A thousand restarts in a row, by SIGKILL, crash on init and exit 0,
// leave the parent's goroutines, fds, child processes and heap as they
// were.
func TestChaosRestartChurn(t *testing.T) {
	n := chaosN(30, 1000)
	dir := t.TempDir()
	f := &chaosFigures{before: chaosSnap()}
	h, stopHandle := chaosStart(t, "chaos", chaosConfig{Dir: dir}, Options{MaxRestartDelay: 5 * time.Millisecond})
	srv := httptest.NewServer(h)
	client := chaosClient(2)
	restarts0 := h.Stats().Restarts
	marker := filepath.Join(dir, "crash-next")
	var how [3]int
	mid := chaosSnapshot{}
	start := time.Now()
	for i := range n {
		pid := chaosPid(t, h)
		switch i % 3 {
		case 0:
			syscall.Kill(pid, syscall.SIGKILL)
		case 1: // crash on init: the next child panics in its ModuleFunc
			require.NoError(t, os.WriteFile(marker, nil, 0o644))
			syscall.Kill(pid, syscall.SIGKILL)
		case 2:
			f.sent.Add(1)
			res, err := client.Get(srv.URL + "/exit?code=0")
			f.count502(t, context.Background(), "GET /exit", res, err)
		}
		how[i%3]++
		awaitStats(t, h, 30*time.Second, fmt.Sprintf("restart %d: a new child", i), chaosRunningOtherThan(pid))
		if i%3 == 1 {
			if _, err := os.Stat(marker); err == nil {
				t.Fatalf("restart %d: the new child serves but did not crash on init", i)
			}
		}
		if i == n/2 {
			mid = chaosSnap()
		}
	}
	took := time.Since(start)
	f.restarts = h.Stats().Restarts - restarts0
	client.CloseIdleConnections()
	srv.Close()
	stopHandle()
	f.settle(10 * time.Second)
	f.addf("%d kill -9, %d crash on init (each one more restart), %d exit 0, in %v (%v per restart)", how[0], how[1], how[2], took.Round(time.Millisecond), (took / time.Duration(f.restarts)).Round(time.Microsecond))
	f.addf("midway: %d goroutines, %d fds, %d children, heap %s", mid.goroutines, mid.fds, mid.children, mib(mid.heap))
	f.report(t, "restart churn")
	f.check(t, 4<<20)
	want := n + how[1]
	assert.Equal(t, want, f.restarts, "%d restarts, want %d", f.restarts, want)
}

// chaosHelperParentEnv makes TestChaosHelperParent act as a parent process
// for TestChaosParentDeath.
const chaosHelperParentEnv = "SUBPROC_CHAOS_HELPER_PARENT"

// TestChaosHelperParent is not a test: TestChaosParentDeath runs it in a
// second copy of the test binary, to have a parent it can kill. It starts
// two modules, puts requests in flight in each (blocked handlers, a handler
// that never returns, streams nobody reads, a request body that never
// ends), starves the second child's runtime (see chaosHang), prints the
// children's pids and "ready", and waits for its stdin to end.
func TestChaosHelperParent(t *testing.T) {
	if os.Getenv(chaosHelperParentEnv) != "1" {
		t.Skip("a helper process for TestChaosParentDeath")
	}
	client := chaosClient(32)
	for _, name := range []string{"chaos", "chaos-b"} {
		h, err := Start(context.Background(), name, Options{HealthInterval: time.Hour, Stderr: io.Discard, Logger: discardLogger()})
		require.NoError(t, err)
		srv := httptest.NewServer(h)
		for _, path := range []string{"/block", "/block", "/block", "/forever", "/forever", "/slow?bytes=1073741824", "/slow?bytes=1073741824"} {
			go func() {
				if res, err := client.Get(srv.URL + path); err == nil {
					defer res.Body.Close()
					select {} // the body is never read; the process is killed
				}
			}()
		}
		for range 2 {
			go func() {
				pr, _ := io.Pipe() // a body that never ends
				client.Post(srv.URL+"/echo", "x", pr)
			}()
		}
		for {
			c, err := chaosGetCounts(client, srv.URL)
			if err == nil && c.Started >= 7 {
				break
			}
			time.Sleep(10 * time.Millisecond) // the child's progress: poll
		}
		if name == "chaos-b" {
			// This child's runtime is starved too: no goroutine of it
			// runs, so only the kernel can end it.
			go client.Get(srv.URL + "/hang?how=starve")
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
				_, err := h.HealthCheck(ctx)
				cancel()
				if err != nil {
					break
				}
				time.Sleep(10 * time.Millisecond) // the child's progress: poll
			}
		}
		fmt.Printf("child-pid %d\n", h.Stats().Pid)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// A parent SIGKILLed while its modules are mid-request leaves no child
// alive one second later.
func TestChaosParentDeath(t *testing.T) {
	rounds := chaosN(1, 10)
	f := &chaosFigures{before: chaosSnap()}
	var slowest time.Duration
	left := 0
	for round := range rounds {
		p := startHelperParent(t, "TestChaosHelperParent", chaosHelperParentEnv)
		var pids []int
		p.await("ready", func(l string) bool {
			if v, ok := strings.CutPrefix(l, "child-pid "); ok {
				pid, _ := strconv.Atoi(v)
				pids = append(pids, pid)
			}
			return l == "ready"
		})
		if len(pids) != 2 {
			t.Fatalf("round %d: the helper parent got ready with child pids %v, want 2; its stderr:\n%s", round, pids, p.stderr)
		}
		f.sent.Add(19) // 9 requests in flight in each module, and the starving one
		killed := p.kill()
		var alive []int
		for _, pid := range pids {
			for !gone(pid) && time.Since(killed) < time.Second {
				time.Sleep(2 * time.Millisecond) // another process's fate: poll
			}
			if !gone(pid) {
				alive = append(alive, pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		slowest = max(slowest, time.Since(killed))
		if len(alive) > 0 {
			left += len(alive)
			t.Errorf("round %d: children %v alive 1s after their parent was SIGKILLed", round, alive)
		}
	}
	f.settle(10 * time.Second)
	f.addf("rounds %d, each a parent with 2 modules and 9 requests in flight in each (one child's runtime starved); children alive 1s after the kill: %d; slowest: all gone %v after the kill",
		rounds, left, slowest.Round(time.Millisecond))
	f.report(t, "parent death")
	f.check(t, 16<<20)
}

// A module whose init exits, freezes, starves its runtime or writes garbage
// onto the protocol before the handshake: Start returns a clear error in
// bounded time and leaves nothing running. (failure_test.go's
// TestFailStartErrors covers an init that fails, panics, exits non-zero or
// sleeps, and a canceled context.)
func TestChaosStartFailures(t *testing.T) {
	const startTimeout = 2 * time.Second
	f := &chaosFigures{before: chaosSnap()}
	for _, tt := range []struct {
		mode   string
		wantIn string
	}{
		{"exit0", "exited before it was ready (exit status 0)"},
		{"sigstop", "StartTimeout"},
		{"starve", "StartTimeout"},
		{"garbage", ""},
		{"garbage-exit", ""},
		// Whether the child's writer has sent the preamble when the
		// module's frame header lands decides which error it is.
		{"huge", "StartTimeout|something other than the subproc protocol"},
		{"bad-ready", "ready"},
		{"close", "protocol pipe (its stdout) closed before it was ready"},
	} {
		t.Run(tt.mode, func(t *testing.T) {
			dir := t.TempDir()
			before := goleak.IgnoreCurrent()
			cfg := fmt.Sprintf(`{"Dir":%q,"InitMode":%q}`, dir, tt.mode)
			start := time.Now()
			f.sent.Add(1)
			h, err := Start(context.Background(), "chaos-init", Options{Config: []byte(cfg), StartTimeout: startTimeout, Stderr: io.Discard, Logger: discardLogger()})
			took := time.Since(start)
			if err == nil {
				h.Close()
				f.wrong.Add(1)
				t.Fatal("Start succeeded")
			}
			var se *StartError
			if !errors.As(err, &se) || se.Module != "chaos-init" {
				t.Errorf("Start's error is %T, want a *StartError for chaos-init: %v", err, err)
			}
			if !slices.ContainsFunc(strings.Split(tt.wantIn, "|"), func(w string) bool { return strings.Contains(err.Error(), w) }) {
				t.Errorf("Start's error does not say %q: %v", tt.wantIn, err)
			}
			assert.LessOrEqual(t, took, startTimeout+20*time.Second, "Start returned after %v; StartTimeout is %v", took, startTimeout)
			b, rerr := os.ReadFile(filepath.Join(dir, "pid"))
			require.NoError(t, rerr, "the module did not record its pid: %v", rerr)
			pid, _ := strconv.Atoi(string(b))
			assertReaped(t, pid)
			goleak.VerifyNone(t, before)
			first, _, _ := strings.Cut(err.Error(), "\n")
			f.addf("%-12s %6v  %s", tt.mode, took.Round(time.Millisecond), first)
		})
	}
	f.settle(10 * time.Second)
	f.report(t, "start failures")
	f.check(t, 16<<20)
}
