package subproc

// End-to-end tests of containment: the processes a module starts (its
// grandchildren, seen from the test) die with its child, whether the child
// stops, crashes, is killed by a health check, or is left behind by a
// parent killed with SIGKILL, running, stopped or with its Go runtime
// starved. They run real children of the escape- modules registered below.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// escapeGrandchildEnv makes TestEscapeGrandchild block: the escape module
// re-executes the test binary with it, as a module may re-execute its own
// binary.
const escapeGrandchildEnv = "SUBPROC_ESCAPE_GRANDCHILD"

// escapeDeadline bounds how long a test waits for processes to die. They
// die within milliseconds; the margin is for a loaded machine.
const escapeDeadline = 10 * time.Second

func init() {
	Register("escape-mod", escapeModule)
	Register("escape-mod2", escapeModule)
}

// escapeSpawnConfig, as Options.Config, makes escapeModule start its
// processes in its ModuleFunc, so that each child of a pool has some.
const escapeSpawnConfig = "spawn"

// escapeModule is a module that starts processes and then dies in the ways
// a child can die.
func escapeModule(ctx context.Context, env *Env) (http.Handler, error) {
	if string(env.Config) == escapeSpawnConfig {
		if _, err := escapeStart(); err != nil {
			return nil, err
		}
	}
	mux := http.NewServeMux()
	// GET /spawn starts the processes of escapeStart and answers their
	// pids.
	mux.HandleFunc("GET /spawn", func(w http.ResponseWriter, r *http.Request) {
		pids, err := escapeStart()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		io.WriteString(w, strings.Join(pids, " "))
	})
	// GET /exit exits with status 2.
	mux.HandleFunc("GET /exit", func(w http.ResponseWriter, r *http.Request) {
		os.Exit(2)
	})
	// GET /panic panics in a goroutine of its own, which ends the child.
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) {
		go panic("escape-mod: a goroutine panics")
		<-r.Context().Done()
	})
	// GET /starve starves the child's Go runtime (see chaosHang).
	mux.HandleFunc("GET /starve", func(w http.ResponseWriter, r *http.Request) {
		chaosHang("starve")
		<-r.Context().Done()
	})
	return mux, nil
}

// escapeStart starts "sleep 300" and a re-execution of this binary that
// blocks, and returns "<sleep pid>" and "<re-execution pid>". It reaps them
// if they die before the module does.
func escapeStart() ([]string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	reexec := exec.Command(exe, "-test.run=^TestEscapeGrandchild$", "-test.count=1", "-test.timeout=5m")
	reexec.Env = append(os.Environ(), escapeGrandchildEnv+"=1")
	var pids []string
	for _, cmd := range []*exec.Cmd{exec.Command("sleep", "300"), reexec} {
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		go cmd.Wait()
		pids = append(pids, strconv.Itoa(cmd.Process.Pid))
	}
	return pids, nil
}

// TestEscapeGrandchild is not a test: escapeModule runs it in a process of
// its own, which blocks until it is killed (or its -test.timeout ends it).
func TestEscapeGrandchild(t *testing.T) {
	if os.Getenv(escapeGrandchildEnv) != "1" {
		t.Skip("a helper process for the escape tests")
	}
	select {}
}

// escapeSpawn has the module behind h start its processes and returns
// their pids.
func escapeSpawn(t testing.TB, h http.Handler) []int {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/spawn", nil))
	require.Equal(t, http.StatusOK, rec.Code, "GET /spawn: %d %s", rec.Code, rec.Body)
	var pids []int
	for _, f := range strings.Fields(rec.Body.String()) {
		pid, err := strconv.Atoi(f)
		require.NoError(t, err, "GET /spawn answered %q", rec.Body)
		pids = append(pids, pid)
	}
	require.Len(t, pids, 2, "GET /spawn answered %q, want two pids", rec.Body)
	return pids
}

// escapeGroup returns the processes of process group pgid that have not
// exited (zombies left out), from /proc.
func escapeGroup(pgid int) []int {
	var pids []int
	for _, p := range procList() {
		if !p.exited() && p.pgrp == pgid {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// escapeCleanup makes sure that whatever the test leaves running of
// process group pgid, and the given pids, is killed when the test ends.
func escapeCleanup(t *testing.T, pgid int, pids []int) {
	t.Cleanup(func() {
		for _, pid := range append(escapeGroup(pgid), pids...) {
			if !gone(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

// escapeAwaitGone waits until the processes pids, and every process of
// group pgid, have exited, failing the test if one has not within
// escapeDeadline of since, and returns how long it took from since.
func escapeAwaitGone(t *testing.T, since time.Time, pgid int, pids []int) time.Duration {
	t.Helper()
	alive := func() []int {
		var left []int
		for _, pid := range append(pids, escapeGroup(pgid)...) {
			if !gone(pid) && !slices.Contains(left, pid) {
				left = append(left, pid)
			}
		}
		return left
	}
	for {
		left := alive()
		if len(left) == 0 {
			return time.Since(since)
		}
		if time.Since(since) > escapeDeadline {
			var states []string
			for _, pid := range left {
				states = append(states, fmt.Sprintf("%d (state %q)", pid, procState(pid)))
			}
			t.Fatalf("%v after the child's end, processes it started still run: %s", escapeDeadline, strings.Join(states, ", "))
		}
		time.Sleep(5 * time.Millisecond) // other processes' fate: poll
	}
}

// escapeAssertAlive fails the test unless each of pids runs.
func escapeAssertAlive(t *testing.T, pids []int) {
	t.Helper()
	for _, pid := range pids {
		require.False(t, gone(pid), "process %d, started by the module, is not running", pid)
	}
}

// The processes a module started die with its child, whichever way the
// child ends while the parent lives.
func TestEscapeChildEnds(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		end  func(t *testing.T, h *Handle, pid int)
	}{
		{
			name: "close",
			end: func(t *testing.T, h *Handle, pid int) {
				assert.NoError(t, h.Close(), "Close")
			},
		},
		{
			name: "exit",
			end: func(t *testing.T, h *Handle, pid int) {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/exit", nil))
				assert.Equal(t, http.StatusBadGateway, rec.Code, "GET /exit: %d, want 502", rec.Code)
			},
		},
		{
			name: "panic",
			end: func(t *testing.T, h *Handle, pid int) {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/panic", nil))
				assert.Equal(t, http.StatusBadGateway, rec.Code, "GET /panic: %d, want 502", rec.Code)
			},
		},
		{
			name: "health",
			opts: Options{HealthInterval: 50 * time.Millisecond, HealthTimeout: 200 * time.Millisecond, HealthFailures: 2},
			end: func(t *testing.T, h *Handle, pid int) {
				require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := tt.opts
			if opts.HealthInterval == 0 {
				opts.HealthInterval = time.Hour
			}
			h := startModule(t, "escape-mod", opts)
			pid := h.Stats().Pid
			pids := escapeSpawn(t, h)
			escapeCleanup(t, pid, pids)
			escapeAssertAlive(t, pids)
			g := escapeGroup(pid)
			require.GreaterOrEqual(t, len(g), 3, "the child's process group %d holds %v, want the child and the processes it started", pid, g)
			ended := time.Now()
			tt.end(t, h, pid)
			took := escapeAwaitGone(t, ended, pid, append(pids, pid))
			t.Logf("the child and the processes it started were gone %v after the %s", took, tt.name)
		})
	}
}

// escapeHelperParentEnv makes TestEscapeHelperParent act as a parent
// process for TestEscapeParentDeath.
const escapeHelperParentEnv = "SUBPROC_ESCAPE_HELPER_PARENT"

// TestEscapeHelperParent is not a test: TestEscapeParentDeath runs it in a
// second copy of the test binary, to have a parent it can kill. It starts
// escape-mod, has it start its processes, prints "pids <child> <sleep>
// <re-execution>", and then obeys its stdin, a line at a time: "starve"
// starves the child's runtime and prints "starved" once the child stops
// answering health checks. It waits for its stdin to end.
func TestEscapeHelperParent(t *testing.T) {
	if os.Getenv(escapeHelperParentEnv) != "1" {
		t.Skip("a helper process for TestEscapeParentDeath")
	}
	h, err := Start(context.Background(), "escape-mod", Options{HealthInterval: time.Hour, Stderr: io.Discard, Logger: discardLogger()})
	require.NoError(t, err)
	pids := escapeSpawn(t, h)
	fmt.Printf("pids %d %d %d\n", h.Stats().Pid, pids[0], pids[1])
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() != "starve" {
			continue
		}
		go h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/starve", nil))
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			_, err := h.HealthCheck(ctx)
			cancel()
			if err != nil {
				break
			}
			time.Sleep(10 * time.Millisecond) // the child's progress: poll
		}
		fmt.Println("starved")
	}
	h.Close()
}

// The processes a module started die with its child when the parent is
// killed by SIGKILL, whether the child runs, is stopped (with its process
// group kept from being orphaned, so that the kernel's SIGHUP and SIGCONT
// to an orphaned group with a stopped member cannot help) or has its Go
// runtime starved, so that it runs no handler.
func TestEscapeParentDeath(t *testing.T) {
	for _, state := range []string{"running", "stopped", "starved"} {
		t.Run(state, func(t *testing.T) {
			p := startHelperParent(t, "TestEscapeHelperParent", escapeHelperParentEnv)
			pidsLine := p.await("pids", func(l string) bool { return strings.HasPrefix(l, "pids ") })
			var pid int
			var pids []int
			for _, f := range strings.Fields(strings.TrimPrefix(pidsLine, "pids ")) {
				p, err := strconv.Atoi(f)
				require.NoError(t, err, "bad pid %q from the helper parent", f)
				pids = append(pids, p)
			}
			require.Len(t, pids, 3, "the helper parent printed pids %v, want three", pids)
			pid, pids = pids[0], pids[1:]
			escapeCleanup(t, pid, append(pids, pid))
			escapeAssertAlive(t, append(pids, pid))
			switch state {
			case "stopped":
				escapeStop(t, pid)
			case "starved":
				io.WriteString(p.stdin, "starve\n")
				p.await("starved", func(l string) bool { return l == "starved" })
			}

			killed := p.kill()
			took := escapeAwaitGone(t, killed, pid, append(pids, pid))
			t.Logf("the %s child and the processes it started were gone %v after their parent was killed", state, took)
		})
	}
}

// escapeRunWatcher runs this binary as a watcher by hand, with envWatcher
// set to value and stdin reading input (nil: /dev/null) to its end, and
// returns how it ended and what it wrote to stderr.
func escapeRunWatcher(t *testing.T, value string, input []byte) (error, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envWatcher+"="+value)
	stderr := newLogSink()
	cmd.Stderr = stderr
	if input != nil {
		// Written, and closed, before the watcher starts: it finds all of
		// it in the pipe, as it would after its parent's death.
		r, w, err := os.Pipe()
		require.NoError(t, err)
		defer r.Close()
		if _, err := w.Write(input); err != nil {
			t.Fatal(err)
		}
		w.Close()
		cmd.Stdin = r
	}
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err, stderr.String()
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the watcher still runs after 30s; its stderr:\n%s", stderr)
	}
	return nil, ""
}

// A watcher started by hand refuses to run, and kills nothing, unless its
// stdin is a pipe that begins with the hello of the parent it was told of.
func TestEscapeWatcherMisuse(t *testing.T) {
	me := os.Getpid()
	tests := []struct {
		name  string
		value string
		input func(pgid int) []byte // nil: stdin is /dev/null
	}{
		{"garbage", "garbage", func(pgid int) []byte { return fmt.Appendf(nil, "%s+%d\n", watcherHello(me), pgid) }},
		{"stdin not a pipe", strconv.Itoa(me), nil},
		{"no hello", strconv.Itoa(me), func(pgid int) []byte { return fmt.Appendf(nil, "+%d\n", pgid) }},
		{"another parent's hello", strconv.Itoa(me), func(pgid int) []byte { return fmt.Appendf(nil, "%s+%d\n", watcherHello(me+1), pgid) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pgid := anchorGroup(t, 0).Process.Pid // what the watcher must not kill
			var input []byte
			if tt.input != nil {
				input = tt.input(pgid)
			}
			err, stderr := escapeRunWatcher(t, tt.value, input)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != exitMisused {
				t.Errorf("the watcher ended with %v, want exit status %d", err, exitMisused)
			}
			for _, want := range []string{envWatcher, "not by subproc.Start", "Unset"} {
				assert.Contains(t, stderr, want, "the watcher's stderr does not say %q:\n%s", want, stderr)
			}
			assert.False(t, gone(pgid), "the watcher killed a process group it was not given by a parent")
		})
	}
}

// A watcher whose stdin ends kills the groups registered and not
// unregistered in what was left in the pipe, and no other, and exits.
func TestEscapeWatcherKills(t *testing.T) {
	kept, unregistered, other := anchorGroup(t, 0), anchorGroup(t, 0), anchorGroup(t, 0)
	input := fmt.Appendf(nil, "%s+%d\n+%d\n-%d\n+0\n+junk\n+%d", watcherHello(os.Getpid()),
		kept.Process.Pid, unregistered.Process.Pid, unregistered.Process.Pid, other.Process.Pid) // the last line is cut off
	err, stderr := escapeRunWatcher(t, strconv.Itoa(os.Getpid()), input)
	assert.NoError(t, err, "the watcher ended with %v, want exit status 0; its stderr:\n%s", err, stderr)
	if err := kept.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("the registered group: sleep ended with %v, want killed", err)
	}
	for _, a := range []*exec.Cmd{unregistered, other} {
		assert.False(t, gone(a.Process.Pid), "the watcher killed group %d, which it was not to kill", a.Process.Pid)
	}
}

// escapeWatchers returns the watchers that process ppid started and that
// have not exited: processes started with envWatcher set (Main unsets it,
// but /proc/<pid>/environ keeps what the process started with).
func escapeWatchers(ppid int) []int {
	var pids []int
	for _, p := range procList() {
		if p.exited() || p.ppid != ppid {
			continue
		}
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.pid))
		if slices.Contains(strings.Split(string(env), "\x00"), envWatcher+"="+strconv.Itoa(ppid)) {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// escapeEnsureWatcher starts this process's watcher if none runs, as the
// first spawn would. A test that counts this process's children and file
// descriptors (two: the watcher's pipe and its pidfd) before and after its
// Handles ran calls it first, so as to count the watcher, which outlives
// every Handle, in both.
func escapeEnsureWatcher() error {
	theWatcher.mu.Lock()
	defer theWatcher.mu.Unlock()
	if theWatcher.cmd != nil {
		return nil
	}
	return theWatcher.startLocked()
}

// One watcher serves every Handle of a process and every child of each.
func TestEscapeOneWatcher(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("counts processes in /proc")
	}
	h1 := startModule(t, "escape-mod", Options{HealthInterval: time.Hour})
	h2 := startModule(t, "escape-mod2", Options{HealthInterval: time.Hour, Children: 2})
	n := len(h1.Stats().Children) + len(h2.Stats().Children)
	require.EqualValues(t, 3, n, "%d children run, want 3", n)
	w := escapeWatchers(os.Getpid())
	require.Len(t, w, 1, "%d watchers run while two Handles (three children) do: %v, want 1", len(w), w)
	assert.Equal(t, theWatcher.pid(), w[0], "the watcher that runs is pid %d, the one the parent knows %d", w[0], theWatcher.pid())
	t.Logf("the watcher, pid %d: %s", w[0], escapeMemory(w[0]))

	// A child's group is registered while it runs, and not once it is
	// reaped.
	registered := func(pid int) bool {
		theWatcher.mu.Lock()
		defer theWatcher.mu.Unlock()
		_, ok := theWatcher.groups[pid]
		return ok
	}
	pid := h1.Stats().Pid
	assert.True(t, registered(pid), "the group of running child %d is not registered with the watcher", pid)
	stopAndReap(t, h1)
	assert.False(t, registered(pid), "the group of reaped child %d is still registered with the watcher", pid)
}

// escapeMemory returns the memory and thread figures of process pid.
func escapeMemory(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var figs []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"VmRSS:", "RssAnon:", "RssFile:", "Threads:"} {
			if v, ok := strings.CutPrefix(l, k); ok {
				figs = append(figs, k+" "+strings.Join(strings.Fields(v), " "))
			}
		}
	}
	return strings.Join(figs, ", ")
}

// escapeHelpersEnv makes TestEscapeHelperParents act as a parent process
// for TestEscapeParentDeathPool and TestEscapeWatcherKilled.
const escapeHelpersEnv = "SUBPROC_ESCAPE_HELPER_PARENTS"

// TestEscapeHelperParents is not a test: tests run it in a second copy of
// the test binary, to have a parent they can kill. It obeys its stdin, a
// line at a time, and answers each command with a line on its stdout:
//
//	start <module> <children>  starts a Handle whose children start their
//	                           processes at init; "started <i> <child pids>"
//	close <i>                  closes Handle i; "closed <i>"
//	kill-watcher               SIGKILLs the watcher, waits for its exit;
//	                           "watcher-killed <pid>"
//	watchers                   "watchers <pid the parent knows> <running>..."
//
// or with "error <what>". It waits for its stdin to end.
func TestEscapeHelperParents(t *testing.T) {
	if os.Getenv(escapeHelpersEnv) != "1" {
		t.Skip("a helper process for the escape tests")
	}
	var hs []*Handle
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 3 && f[0] == "start":
			n, _ := strconv.Atoi(f[2])
			h, err := Start(context.Background(), f[1], Options{Children: n, Config: []byte(escapeSpawnConfig), HealthInterval: time.Hour, Stderr: io.Discard, Logger: discardLogger()})
			if err != nil {
				fmt.Printf("error %v\n", strings.ReplaceAll(err.Error(), "\n", " "))
				continue
			}
			hs = append(hs, h)
			line := fmt.Sprintf("started %d", len(hs)-1)
			for _, c := range h.Stats().Children {
				line += fmt.Sprintf(" %d", c.Pid)
			}
			fmt.Println(line)
		case len(f) == 2 && f[0] == "close":
			i, _ := strconv.Atoi(f[1])
			hs[i].Close()
			fmt.Printf("closed %d\n", i)
		case len(f) == 1 && f[0] == "kill-watcher":
			pid := theWatcher.pid()
			if pid == 0 {
				fmt.Println("error no watcher runs")
				continue
			}
			syscall.Kill(pid, syscall.SIGKILL)
			// Not only its first thread, a zombie while the others exit
			// and hold its files (its stdin) open: the whole process.
			awaitExit(pid)
			fmt.Printf("watcher-killed %d\n", pid)
		case len(f) == 1 && f[0] == "watchers":
			line := fmt.Sprintf("watchers %d", theWatcher.pid())
			for _, pid := range escapeWatchers(os.Getpid()) {
				line += fmt.Sprintf(" %d", pid)
			}
			fmt.Println(line)
		}
	}
	for _, h := range hs {
		h.Close()
	}
}

// escapeParent drives a TestEscapeHelperParents process.
type escapeParent struct{ *helperParent }

// startEscapeParent starts a TestEscapeHelperParents process, killed at
// the test's end if the test did not kill it.
func startEscapeParent(t *testing.T) *escapeParent {
	return &escapeParent{startHelperParent(t, "TestEscapeHelperParents", escapeHelpersEnv)}
}

// do sends a command and returns the fields of its answer, which must
// begin with want.
func (p *escapeParent) do(command, want string) []string {
	p.t.Helper()
	io.WriteString(p.stdin, command+"\n")
	l := p.await(fmt.Sprintf("its answer to %q", command), func(l string) bool {
		f := strings.Fields(l)
		return len(f) > 0 && (f[0] == want || f[0] == "error")
	})
	f := strings.Fields(l)
	if f[0] == "error" {
		p.t.Fatalf("the helper parent, told %q: %s; its stderr:\n%s", command, l, p.stderr)
	}
	return f[1:]
}

// start starts a Handle of module in the helper parent and returns the
// pids of its children, each of which has started its processes, checked
// to run in the child's process group.
func (p *escapeParent) start(module string, children int) []int {
	p.t.Helper()
	f := p.do(fmt.Sprintf("start %s %d", module, children), "started")
	var pids []int
	for _, s := range f[1:] {
		pid, err := strconv.Atoi(s)
		if err != nil {
			p.t.Fatalf("bad pid %q from the helper parent", s)
		}
		if g := escapeGroup(pid); len(g) < 3 {
			p.t.Fatalf("the child's process group %d holds %v, want the child and the processes it started", pid, g)
		}
		escapeCleanup(p.t, pid, nil)
		pids = append(pids, pid)
	}
	if len(pids) != children {
		p.t.Fatalf("the helper parent started children %v, want %d", pids, children)
	}
	return pids
}

// escapeStop stops the child pid, with a process of the test's in its
// group, so that the group is not orphaned when the parent dies and the
// kernel's SIGHUP and SIGCONT to an orphaned group with a stopped member
// cannot help: only a watcher kills the processes the child started.
func escapeStop(t *testing.T, pid int) {
	t.Helper()
	anchorGroup(t, pid)
	require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
	waitFor(t, 10*time.Second, "the child to stop", func() bool { return procState(pid) == "T" })
}

// escapeAwaitGroupsGone waits until every process of the groups pgids has
// exited (see escapeAwaitGone), and returns how long the last took.
func escapeAwaitGroupsGone(t *testing.T, since time.Time, pgids []int) time.Duration {
	t.Helper()
	var took time.Duration
	for _, pgid := range pgids {
		took = max(took, escapeAwaitGone(t, since, pgid, []int{pgid}))
	}
	return took
}

// The processes that the children of several Handles, pools among them,
// started die with them when their parent is killed by SIGKILL, though
// each child is stopped: the one watcher of the parent kills them all.
func TestEscapeParentDeathPool(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("counts processes in /proc")
	}
	p := startEscapeParent(t)
	pids := append(p.start("escape-mod", 3), p.start("escape-mod2", 1)...)
	f := p.do("watchers", "watchers")
	require.Len(t, f, 2, "the helper parent's watcher, and those that run: %v, want one, the same", f)
	require.Equal(t, f[1], f[0], "the helper parent's watcher, and those that run: %v, want one, the same", f)
	for _, pid := range pids {
		escapeStop(t, pid)
	}
	took := escapeAwaitGroupsGone(t, p.kill(), pids)
	t.Logf("%d stopped children of two Handles, and the processes they started, were gone %v after their parent was killed", len(pids), took)
}

// A watcher that someone kills is replaced at the next child's start, and
// the replacement is told of every live group: those of children started
// before, and that child's, so that, though each child is stopped, no
// process they started outlives their parent killed by SIGKILL. The
// parent notices the death at the next child's start, or before, at a
// child's end, which then only forgets the dead watcher.
func TestEscapeWatcherKilled(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("counts processes in /proc")
	}
	for _, childEnds := range []bool{false, true} {
		name := "then a child starts"
		if childEnds {
			name = "then a child ends, then one starts"
		}
		t.Run(name, func(t *testing.T) {
			p := startEscapeParent(t)
			pids := p.start("escape-mod", 1)
			p.start("escape-mod2", 1)
			old := p.do("kill-watcher", "watcher-killed")[0]
			if childEnds {
				p.do("close 1", "closed") // its unregistration fails
			}
			pids = append(pids, p.start("escape-mod2", 1)...)
			f := p.do("watchers", "watchers")
			if len(f) != 2 || f[0] != f[1] || f[0] == old {
				t.Fatalf("after watcher %s was killed, the helper parent's watcher, and those that run: %v, want one new one, the same", old, f)
			}
			for _, pid := range pids {
				escapeStop(t, pid)
			}
			took := escapeAwaitGroupsGone(t, p.kill(), pids)
			t.Logf("stopped children started before and after their watcher was killed, and the processes they started, were gone %v after their parent was killed", took)
		})
	}
}

// awaitWatcher takes a watcher for ready once it has said so, whatever it
// wrote before, and reports what it wrote if it exits without saying so.
func TestEscapeAwaitWatcher(t *testing.T) {
	tests := []struct {
		name    string
		output  string
		wantErr string // "" for ready
	}{
		{"ready", watcherReady, ""},
		{"ready after other output", "init says hello\n" + watcherReady, ""},
		{"exits", "listening on :8080\n", `it exited before it was ready; its output: "listening on :8080\n"`},
		{"exits silently", "", "it exited before it was ready"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, w, err := os.Pipe()
			require.NoError(t, err)
			defer r.Close()
			io.WriteString(w, tt.output)
			w.Close() // the watcher's exit
			err = awaitWatcher(r)
			if tt.wantErr == "" {
				assert.NoError(t, err, "awaitWatcher: %v, want nil", err)
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("awaitWatcher: %v, want %s", err, tt.wantErr)
			}
		})
	}
}
