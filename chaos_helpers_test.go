package subproc

// The modules, clients and measurements of the chaos suite (chaos_test.go).

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net/http"
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
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chaosConfig is what the chaos modules read from Env.Config.
type chaosConfig struct {
	Dir      string // <Dir>/crash-next makes the next ModuleFunc remove it and panic; "" for none
	InitMode string // chaos-init only: how its ModuleFunc misbehaves (see chaosInit)
}

func init() {
	Register("chaos", chaosModule)
	Register("chaos-b", chaosModule)
	Register("chaos-init", chaosInit)
}

// chaosCounts is what GET /counts of the chaos module returns: the fate of
// its /slow, /block and /forever handlers in this incarnation.
type chaosCounts struct {
	Started  int64 // handlers entered
	Canceled int64 // handlers that saw their request's context end or a write fail
	Finished int64 // handlers that wrote their whole body
	Active   int64 // handlers still running
}

// chaosSmallBody is the body of GET /small?id=id.
func chaosSmallBody(id string) string {
	return fmt.Sprintf("small %s %08x\n", id, crc32.ChecksumIEEE([]byte(id)))
}

// chaosStreamBytes returns the deterministic body of GET /stream?id=id&bytes=n.
func chaosStreamBytes(id uint64, n int) []byte {
	r := rand.New(rand.NewPCG(id, 0x5eed))
	b := make([]byte, n+7)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

func chaosSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func chaosModule(ctx context.Context, env *Env) (http.Handler, error) {
	var cfg chaosConfig
	if len(env.Config) > 0 {
		if err := json.Unmarshal(env.Config, &cfg); err != nil {
			return nil, err
		}
	}
	if cfg.Dir != "" {
		marker := filepath.Join(cfg.Dir, "crash-next")
		if os.Remove(marker) == nil {
			panic("chaos: crash on init, as asked by " + marker)
		}
	}
	var counts struct{ started, canceled, finished, active atomic.Int64 }
	enter := func() func(canceled bool) {
		counts.started.Add(1)
		counts.active.Add(1)
		return func(canceled bool) {
			if canceled {
				counts.canceled.Add(1)
			} else {
				counts.finished.Add(1)
			}
			counts.active.Add(-1)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /small", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, chaosSmallBody(r.URL.Query().Get("id")))
	})
	// POST /echo sends the body back and its SHA-256 in the X-Sum trailer.
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).EnableFullDuplex()
		w.Header().Set("Trailer", "X-Sum")
		h := sha256.New()
		if _, err := io.Copy(w, io.TeeReader(r.Body, h)); err != nil {
			return // the trailer is missing: the client sees a wrong answer if the body ends cleanly
		}
		w.Header().Set("X-Sum", hex.EncodeToString(h.Sum(nil)))
	})
	// GET /stream?id=N&bytes=M sends chaosStreamBytes(N, M) in flushed
	// pieces and its SHA-256 in the X-Sum trailer.
	mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
		id, _ := strconv.ParseUint(r.URL.Query().Get("id"), 10, 64)
		n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
		b := chaosStreamBytes(id, n)
		w.Header().Set("Trailer", "X-Sum")
		for p := b; len(p) > 0; {
			k := min(len(p), 20000)
			if _, err := w.Write(p[:k]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			p = p[k:]
		}
		w.Header().Set("X-Sum", chaosSum(b))
	})
	// GET /slow?bytes=M writes M bytes as fast as flow control lets it,
	// counting how it ends.
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		leave := enter()
		n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
		chunk := make([]byte, 16<<10)
		for i := range chunk {
			chunk[i] = 'a' + byte(i%26)
		}
		for n > 0 {
			k := min(n, len(chunk))
			if _, err := w.Write(chunk[:k]); err != nil || r.Context().Err() != nil {
				leave(true)
				return
			}
			n -= k
		}
		leave(false)
	})
	// GET /block answers nothing until its request is canceled.
	mux.HandleFunc("GET /block", func(w http.ResponseWriter, r *http.Request) {
		leave := enter()
		<-r.Context().Done()
		leave(true)
	})
	// GET /forever starts its response and never returns, whatever happens.
	mux.HandleFunc("GET /forever", func(w http.ResponseWriter, r *http.Request) {
		enter()
		io.WriteString(w, "started\n")
		w.(http.Flusher).Flush()
		select {}
	})
	mux.HandleFunc("GET /counts", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(chaosCounts{counts.started.Load(), counts.canceled.Load(), counts.finished.Load(), counts.active.Load()})
	})
	// GET /hang?how=stop|starve freezes the child (see chaosHang).
	mux.HandleFunc("GET /hang", func(w http.ResponseWriter, r *http.Request) {
		chaosHang(r.URL.Query().Get("how"))
		<-r.Context().Done()
	})
	// GET /exit?code=N exits at once.
	mux.HandleFunc("GET /exit", func(w http.ResponseWriter, r *http.Request) {
		code, _ := strconv.Atoi(r.URL.Query().Get("code"))
		os.Exit(code)
	})
	// GET /garbage?how=...&round=N writes garbage onto the protocol pipe to
	// the parent, behind the back of the child's writer (see chaosGarbage),
	// after recording "N pid" in <Dir>/garbage.
	mux.HandleFunc("GET /garbage", func(w http.ResponseWriter, r *http.Request) {
		if cfg.Dir != "" {
			// One line per execution: a request runs at most once.
			f, err := os.OpenFile(filepath.Join(cfg.Dir, "garbage"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
			if err != nil {
				http.Error(w, err.Error(), http.StatusTeapot)
				return
			}
			fmt.Fprintf(f, "%s %d\n", r.URL.Query().Get("round"), os.Getpid())
			f.Close()
		}
		if err := chaosGarbage(r.URL.Query().Get("how")); err != nil {
			http.Error(w, err.Error(), http.StatusTeapot)
			return
		}
		<-r.Context().Done()
	})
	return mux, nil
}

// chaosInit is a module whose ModuleFunc misbehaves as its InitMode says,
// after recording its pid in <Dir>/pid.
func chaosInit(ctx context.Context, env *Env) (http.Handler, error) {
	var cfg chaosConfig
	if err := json.Unmarshal(env.Config, &cfg); err != nil {
		return nil, err
	}
	os.WriteFile(filepath.Join(cfg.Dir, "pid"), []byte(strconv.Itoa(os.Getpid())), 0o644)
	switch cfg.InitMode {
	case "exit0":
		os.Exit(0)
	case "sigstop":
		chaosHang("stop")
	case "starve":
		chaosHang("starve")
	case "garbage", "garbage-exit", "huge", "bad-ready", "close":
		if err := chaosGarbage(cfg.InitMode); err != nil {
			return nil, err
		}
		if cfg.InitMode == "garbage-exit" {
			os.Exit(0)
		}
	default:
		return nil, fmt.Errorf("chaos-init: unknown mode %q", cfg.InitMode)
	}
	select {} // until killed
}

// chaosHang freezes the child process it runs in.
//
// "stop" sends SIGSTOP to the whole process.
//
// "starve" blocks every P of the Go runtime: GOMAXPROCS goroutines each
// enter a read(2) on a pipe nobody writes to, through syscall.RawSyscall,
// which (unlike syscall.Syscall) does not tell the scheduler that the
// goroutine left Go code. The scheduler cannot hand their Ps to other
// goroutines, asynchronous preemption cannot interrupt a thread inside a
// system call (the signal restarts the read, SA_RESTART), and so no other
// goroutine — the child's protocol reader included — ever runs again,
// while the process stays alive and its threads are in state S, not T.
func chaosHang(how string) {
	switch how {
	case "stop":
		syscall.Kill(os.Getpid(), syscall.SIGSTOP)
	case "starve":
		var p [2]int
		if err := syscall.Pipe(p[:]); err != nil {
			panic(err)
		}
		for range runtime.GOMAXPROCS(0) {
			go func() {
				var b [1]byte
				syscall.RawSyscall(syscall.SYS_READ, uintptr(p[0]), uintptr(unsafe.Pointer(&b[0])), 1)
			}()
		}
	default:
		panic("chaos: unknown hang " + how)
	}
}

// chaosWritablePipes returns the fds of a process that are write ends of
// pipes, by the pipe's name ("pipe:[inode]").
func chaosWritablePipes(pid string) map[string][]int {
	ents, _ := os.ReadDir("/proc/" + pid + "/fd")
	pipes := map[string][]int{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink("/proc/" + pid + "/fd/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "pipe:") {
			continue
		}
		info, err := os.ReadFile("/proc/" + pid + "/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(l, "flags:"); ok {
				if flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64); err == nil && flags&3 == syscall.O_WRONLY {
					pipes[link] = append(pipes[link], fd)
				}
			}
		}
	}
	return pipes
}

// chaosProtocolFD finds, in a child, the write end of the protocol pipe to
// the parent: the writable pipe that is not fd 1 (the module's stdout), 2
// (its stderr) or fdLog, nor one the parent can write to too (a pipe
// inherited from whoever started the parent, such as the go command).
func chaosProtocolFD() (int, error) {
	parent := chaosWritablePipes(strconv.Itoa(os.Getppid()))
	var found []int
	for link, fds := range chaosWritablePipes("self") {
		if parent[link] != nil {
			continue
		}
		for _, fd := range fds {
			if fd != 1 && fd != 2 && fd != fdLog {
				found = append(found, fd)
			}
		}
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("chaos: %d candidates for the protocol pipe: %v", len(found), found)
	}
	return found[0], nil
}

// chaosGarbage writes garbage of one kind onto the protocol pipe.
func chaosGarbage(how string) error {
	fd, err := chaosProtocolFD()
	if err != nil {
		return err
	}
	header := func(n uint32, kind, flags uint8, id uint64) []byte {
		b := make([]byte, 16)
		binary.BigEndian.PutUint32(b[0:], n)
		b[4], b[5] = kind, flags
		binary.BigEndian.PutUint64(b[8:], id)
		return b
	}
	var p []byte
	switch how {
	case "garbage", "garbage-exit", "random":
		p = make([]byte, 4000)
		for i := range p {
			p[i] = byte(rand.N(256))
		}
	case "huge": // a ready message announcing 8 MiB, of which 10 bytes come
		p = append(header(8<<20, kindReady, 0, 0), make([]byte, 10)...)
	case "too-large": // a frame over the limit
		p = header(8<<20+1, kindData, 0, 1)
	case "bad-ready": // a ready message whose payload is not gob
		p = append(header(5, kindReady, 0, 0), "hello"...)
	case "unknown-id": // a well-formed response for a request never sent
		p = append(header(0, kindAbort, 0, 1<<40), nil...)
	case "close": // the protocol pipe closes, the process lives on
		return syscall.Close(fd)
	default:
		return fmt.Errorf("chaos: unknown garbage %q", how)
	}
	_, err = syscall.Write(fd, p)
	return err
}

// chaosSnapshot is the parent's resource use at one moment.
type chaosSnapshot struct {
	goroutines int
	fds        int
	children   int
	heap       uint64 // bytes of live heap after a GC
}

func chaosSnap() chaosSnapshot {
	escapeEnsureWatcher() // the parent's one watcher outlives every Handle: count it in
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ents, _ := os.ReadDir("/proc/self/fd")
	return chaosSnapshot{
		goroutines: runtime.NumGoroutine(),
		fds:        len(ents),
		children:   len(chaosChildren()),
		heap:       ms.HeapAlloc,
	}
}

// chaosChildren returns the pids of this process's child processes.
func chaosChildren() []int {
	me := os.Getpid()
	var pids []int
	for _, p := range procList() {
		if p.ppid == me {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// chaosRSS returns a process's resident memory in bytes, 0 if unknown.
func chaosRSS(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// chaosFigures are the figures every scenario reports.
type chaosFigures struct {
	sent, ok, s502, s503, aborted, hung, wrong atomic.Int64
	restarts                                   int
	before, after                              chaosSnapshot
	extra                                      []string // scenario-specific lines
}

func (f *chaosFigures) addf(format string, args ...any) {
	f.extra = append(f.extra, fmt.Sprintf(format, args...))
}

// report logs the figures as a table.
func (f *chaosFigures) report(t *testing.T, name string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "\n== %s ==\n", name)
	row := func(k string, v any) { fmt.Fprintf(&b, "  %-28s %v\n", k, v) }
	row("requests sent", f.sent.Load())
	row("answered 2xx", f.ok.Load())
	row("answered 5xx (502 / 503)", fmt.Sprintf("%d (%d / %d)", f.s502.Load()+f.s503.Load(), f.s502.Load(), f.s503.Load()))
	row("aborted", f.aborted.Load())
	row("hung (deadline passed)", f.hung.Load())
	row("wrong bodies or statuses", f.wrong.Load())
	row("restarts", f.restarts)
	row("leaked goroutines", f.after.goroutines-f.before.goroutines)
	row("leaked fds", f.after.fds-f.before.fds)
	row("leaked child processes", f.after.children-f.before.children)
	row("parent heap before / after", mib(f.before.heap)+" / "+mib(f.after.heap))
	for _, l := range f.extra {
		fmt.Fprintf(&b, "  %s\n", l)
	}
	t.Log(b.String())
}

// check fails the test on any hung request, wrong answer or leak.
func (f *chaosFigures) check(t *testing.T, heapSlack uint64) {
	t.Helper()
	assert.Zero(t, f.hung.Load(), "requests hung past their deadline")
	assert.Zero(t, f.wrong.Load(), "wrong bodies or statuses")
	assert.LessOrEqual(t, f.after.goroutines, f.before.goroutines, "goroutines leaked")
	assert.LessOrEqual(t, f.after.fds, f.before.fds, "file descriptors leaked")
	assert.LessOrEqual(t, f.after.children, f.before.children, "child processes left: %v", chaosChildren())
	assert.LessOrEqual(t, f.after.heap, f.before.heap+heapSlack, "parent heap grew from %s to %s (slack %s)", mib(f.before.heap), mib(f.after.heap), mib(heapSlack))
}

// settle takes the after snapshot once goroutines, fds and children are
// back to their count before, or after timeout: they are released by other
// goroutines and processes (connections closing, children being reaped).
func (f *chaosFigures) settle(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		f.after = chaosSnap()
		if f.after.goroutines <= f.before.goroutines && f.after.fds <= f.before.fds && f.after.children <= f.before.children || time.Now().After(deadline) {
			return
		}
		time.Sleep(20 * time.Millisecond) // others' progress: poll
	}
}

// chaosStart starts a module and returns it with a stop function that shuts
// it down and checks its children are reaped; stop also runs at cleanup.
func chaosStart(t *testing.T, name string, cfg chaosConfig, opts Options) (*Handle, func()) {
	t.Helper()
	opts = withConfig(t, cfg, opts)
	if opts.Logger == nil {
		opts.Logger = discardLogger()
	}
	if opts.Stderr == nil {
		opts.Stderr = io.Discard
	}
	h, err := Start(context.Background(), name, opts)
	require.NoError(t, err, "Start(%q)", name)
	var once sync.Once
	stop := func() { once.Do(func() { stopAndReap(t, h) }) }
	t.Cleanup(stop)
	return h, stop
}

// chaosPid returns the pid of the running child, waiting for one: never 0,
// which kill(2) would take for the test's own process group.
func chaosPid(t *testing.T, h *Handle) int {
	t.Helper()
	var pid int
	awaitStats(t, h, 30*time.Second, "a child running", func(st Stats) bool { pid = st.Pid; return st.State == "running" && pid != 0 })
	return pid
}

// chaosRunningOtherThan is a condition: a child other than pid serves.
func chaosRunningOtherThan(pid int) func(Stats) bool {
	return func(st Stats) bool { return st.State == "running" && st.Pid != 0 && st.Pid != pid }
}

// chaosClient returns an HTTP client for a storm of concurrent clients.
func chaosClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		DisableCompression:  true,
	}}
}

// chaosGetCounts fetches the chaos module's /counts.
func chaosGetCounts(client *http.Client, url string) (chaosCounts, error) {
	var c chaosCounts
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/counts", nil)
	res, err := client.Do(req)
	if err != nil {
		return c, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return c, fmt.Errorf("GET /counts: %s", res.Status)
	}
	return c, json.NewDecoder(res.Body).Decode(&c)
}

// chaosLatencies records durations and reports percentiles.
type chaosLatencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *chaosLatencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *chaosLatencies) pct(p float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0
	}
	s := slices.Clone(l.d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func (l *chaosLatencies) String() string {
	return fmt.Sprintf("p50 %v p99 %v (n=%d)", l.pct(0.50).Round(10*time.Microsecond), l.pct(0.99).Round(10*time.Microsecond), len(l.d))
}

// count502 counts the answer to a request whose child dies under it, which
// must be 502 or an aborted connection; one that ctx cut short is hung.
func (f *chaosFigures) count502(t *testing.T, ctx context.Context, what string, res *http.Response, err error) {
	t.Helper()
	switch {
	case err != nil && ctx.Err() != nil:
		f.hung.Add(1)
	case err != nil:
		f.aborted.Add(1)
	case res.StatusCode == http.StatusBadGateway:
		f.s502.Add(1)
		res.Body.Close()
	default:
		f.wrong.Add(1)
		t.Errorf("%s: %s, want 502", what, res.Status)
		res.Body.Close()
	}
}
