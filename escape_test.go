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
}

// escapeModule is a module that starts processes and then dies in the ways
// a child can die.
func escapeModule(ctx context.Context, env *Env) (http.Handler, error) {
	mux := http.NewServeMux()
	// GET /spawn starts "sleep 300" and a re-execution of this binary that
	// blocks, and answers "<sleep pid> <re-execution pid>". The module
	// reaps them if they die before it does.
	mux.HandleFunc("GET /spawn", func(w http.ResponseWriter, r *http.Request) {
		exe, err := os.Executable()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		reexec := exec.Command(exe, "-test.run=^TestEscapeGrandchild$", "-test.count=1", "-test.timeout=5m")
		reexec.Env = append(os.Environ(), escapeGrandchildEnv+"=1")
		var pids []string
		for _, cmd := range []*exec.Cmd{exec.Command("sleep", "300"), reexec} {
			if err := cmd.Start(); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			go cmd.Wait()
			pids = append(pids, strconv.Itoa(cmd.Process.Pid))
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
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /spawn: %d %s", rec.Code, rec.Body)
	}
	var pids []int
	for _, f := range strings.Fields(rec.Body.String()) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("GET /spawn answered %q", rec.Body)
		}
		pids = append(pids, pid)
	}
	if len(pids) != 2 {
		t.Fatalf("GET /spawn answered %q, want two pids", rec.Body)
	}
	return pids
}

// escapeGroup returns the processes of process group pgid that have not
// exited (zombies left out), from /proc.
func escapeGroup(pgid int) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold anything but ')'.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid {
			pids = append(pids, pid)
		}
	}
	return pids
}

// escapeCleanup makes sure that whatever the test leaves running of
// process group pgid, and the given pids, is killed when the test ends.
func escapeCleanup(t *testing.T, pgid int, pids []int) {
	t.Cleanup(func() {
		for _, pid := range append(escapeGroup(pgid), pids...) {
			if !failGone(pid) {
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
			if !failGone(pid) && !slices.Contains(left, pid) {
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
				states = append(states, fmt.Sprintf("%d (state %q)", pid, failProcState(pid)))
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
		if failGone(pid) {
			t.Fatalf("process %d, started by the module, is not running", pid)
		}
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
				if err := h.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			},
		},
		{
			name: "exit",
			end: func(t *testing.T, h *Handle, pid int) {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/exit", nil))
				if rec.Code != http.StatusBadGateway {
					t.Errorf("GET /exit: %d, want 502", rec.Code)
				}
			},
		},
		{
			name: "panic",
			end: func(t *testing.T, h *Handle, pid int) {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/panic", nil))
				if rec.Code != http.StatusBadGateway {
					t.Errorf("GET /panic: %d, want 502", rec.Code)
				}
			},
		},
		{
			name: "health",
			opts: Options{HealthInterval: 50 * time.Millisecond, HealthTimeout: 200 * time.Millisecond, HealthFailures: 2},
			end: func(t *testing.T, h *Handle, pid int) {
				if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
					t.Fatal(err)
				}
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
			if g := escapeGroup(pid); len(g) < 3 {
				t.Fatalf("the child's process group %d holds %v, want the child and the processes it started", pid, g)
			}
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
	if err != nil {
		t.Fatal(err)
	}
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
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd, stdin, stdout, stderr := startHelperParent(t, ctx, "TestEscapeHelperParent", escapeHelperParentEnv)
			lines := make(chan string, 2)
			readDone := make(chan struct{})
			go func() {
				defer close(readDone)
				sc := bufio.NewScanner(stdout)
				for sc.Scan() {
					if strings.HasPrefix(sc.Text(), "pids ") || sc.Text() == "starved" {
						lines <- sc.Text()
					}
				}
			}()
			waited := false
			t.Cleanup(func() {
				stdin.Close()
				if !waited {
					cmd.Process.Kill()
					<-readDone
					cmd.Wait()
				}
			})
			await := func(what string) string {
				t.Helper()
				select {
				case l := <-lines:
					return l
				case <-readDone:
					t.Fatalf("the helper parent ended before it printed %s; its stderr:\n%s", what, stderr)
				case <-time.After(30 * time.Second):
					t.Fatalf("the helper parent printed no %s in 30s; its stderr:\n%s", what, stderr)
				}
				return ""
			}

			var pid int
			var pids []int
			for _, f := range strings.Fields(strings.TrimPrefix(await("pids"), "pids ")) {
				p, err := strconv.Atoi(f)
				if err != nil {
					t.Fatalf("bad pid %q from the helper parent", f)
				}
				pids = append(pids, p)
			}
			if len(pids) != 3 {
				t.Fatalf("the helper parent printed pids %v, want three", pids)
			}
			pid, pids = pids[0], pids[1:]
			escapeCleanup(t, pid, append(pids, pid))
			escapeAssertAlive(t, append(pids, pid))
			switch state {
			case "stopped":
				// A process of ours in the child's group keeps the group
				// from being orphaned when the parent dies.
				anchor := exec.Command("sleep", "60")
				anchor.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pid}
				if err := anchor.Start(); err != nil {
					t.Fatalf("starting a process in the child's process group: %v", err)
				}
				t.Cleanup(func() {
					anchor.Process.Kill()
					anchor.Wait()
				})
				if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
					t.Fatal(err)
				}
				failWaitUntil(t, 10*time.Second, "the child to stop", func() bool { return failProcState(pid) == "T" })
			case "starved":
				io.WriteString(stdin, "starve\n")
				await("starved")
			}

			killed := time.Now()
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			<-readDone
			waited = true
			cmd.Wait()
			took := escapeAwaitGone(t, killed, pid, append(pids, pid))
			t.Logf("the %s child and the processes it started were gone %v after their parent was killed", state, took)
		})
	}
}

// A watcher started by hand refuses to run, and kills nothing, unless it is
// in the process group it was told to watch; one that is, and whose parent
// is not the one it was told of, kills the group at once.
func TestEscapeWatcherMisuse(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("only Linux has watchers")
	}
	tests := []struct {
		name     string
		ids      func(pgid int) string
		wantKill bool // the watcher kills its group, else it exits with status 2
	}{
		{"garbage", func(int) string { return "garbage" }, false},
		{"other group", func(pgid int) string { return fmt.Sprintf("%d %d", os.Getpid(), pgid+1) }, false},
		{"parent gone", func(pgid int) string { return fmt.Sprintf("1 %d", pgid) }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The group the watcher joins, and that it may kill.
			anchor := exec.Command("sleep", "60")
			anchor.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := anchor.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				anchor.Process.Kill()
				anchor.Wait()
			}()
			pgid := anchor.Process.Pid
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), envWatcher+"="+tt.ids(pgid))
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pgid}
			stderr := newFailLog()
			cmd.Stderr = stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatalf("the watcher still runs after 30s; its stderr:\n%s", stderr)
			}
			if tt.wantKill {
				if err == nil || !strings.Contains(err.Error(), "killed") {
					t.Errorf("the watcher ended with %v, want killed (by its own kill of its group)", err)
				}
				if err := anchor.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
					t.Errorf("the watcher's group: sleep ended with %v, want killed", err)
				}
				return
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != exitMisused {
				t.Errorf("the watcher ended with %v, want exit status %d", err, exitMisused)
			}
			for _, want := range []string{envWatcher, "not by subproc.Start", "Unset"} {
				if !strings.Contains(stderr.String(), want) {
					t.Errorf("the watcher's stderr does not say %q:\n%s", want, stderr)
				}
			}
			if failGone(pgid) {
				t.Errorf("the watcher killed its group")
			}
		})
	}
}
