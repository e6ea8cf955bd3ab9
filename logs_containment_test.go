//go:build linux

package subproc

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// Modules of this file are named logsc-*.
func init() {
	// logsc-writer writes n lines "<tag> <i>" to its stderr on GET
	// /write?n=<n>&tag=<tag>, and answers ok to any other request.
	Register("logsc-writer", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(r.FormValue("n"))
			tag := r.FormValue("tag")
			for i := range n {
				fmt.Fprintf(os.Stderr, "%s %d\n", tag, i)
			}
			fmt.Fprint(w, "written")
		})
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })
		return mux, nil
	})
	// logsc-quiet writes a line to each of its streams at init.
	Register("logsc-quiet", func(ctx context.Context, env *Env) (http.Handler, error) {
		env.Logger.Info("init")
		fmt.Println("stdout at init")
		fmt.Fprintln(os.Stderr, "stderr at init")
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") }), nil
	})
	// logsc-forger writes lines meant to move the terminal's cursor and
	// forge another module's line.
	Register("logsc-forger", func(ctx context.Context, env *Env) (http.Handler, error) {
		fmt.Fprint(os.Stderr, "\x1b[1A\x1b[2K\r[logsc-other] forged\n")
		fmt.Fprint(os.Stdout, "half\rwritten\u009b\x7f\xff\n")
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") }), nil
	})
}

var logscCycles = flag.Int("logsc.cycles", 20, "Start/Close cycles of TestLogsNoGoroutinePerLogDir")

// TestLogsNoGoroutinePerLogDir starts and closes a module many times, each
// time with a new LogDir, and checks that no goroutine outlives its Close
// (lumberjack, the rotation library used before, left three per LogDir).
func TestLogsNoGoroutinePerLogDir(t *testing.T) {
	before := goleak.IgnoreCurrent()
	n0 := runtime.NumGoroutine()
	root := t.TempDir()
	for i := range *logscCycles {
		dir := filepath.Join(root, strconv.Itoa(i))
		h, err := Start(context.Background(), "logsc-quiet", testOptions(t, Options{LogDir: dir}))
		require.NoError(t, err, "cycle %d: Start", i)
		stopAndReap(t, h)
		if t.Failed() {
			t.FailNow()
		}
	}
	assert.FileExists(t, filepath.Join(root, "0", "logsc-quiet.err"), "the first cycle's log file")
	err := goleak.Find(before)
	t.Logf("after %d Start/Close cycles, each with its own LogDir: %d goroutines more than before", *logscCycles, runtime.NumGoroutine()-n0)
	assert.NoError(t, err)
}

// TestLogsFullDisk runs a module with its LogDir on a tiny tmpfs, fills it,
// and checks that the parent reports the lost lines through its Logger,
// that the module keeps serving, and that writing resumes, and is reported
// to resume, once space returns. It needs to mount a file system (root with
// CAP_SYS_ADMIN); internal/logcapture's TestWriteErrors checks the same
// logic through a seam everywhere.
func TestLogsFullDisk(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=256k"); err != nil {
		t.Skipf("cannot mount a tmpfs on %s (%v): run the tests as root with CAP_SYS_ADMIN to test a real full disk; internal/logcapture's TestWriteErrors tests the logic through a seam", dir, err)
	}
	t.Cleanup(func() {
		assert.NoError(t, syscall.Unmount(dir, 0), "unmounting the tmpfs")
	})
	logs := newLogSink()
	h := startModule(t, "logsc-writer", Options{LogDir: dir, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	srv := serve(t, h)

	fill(t, filepath.Join(dir, "filler"))
	code, body := fetch(t, srv.URL+"/write?n=1000&tag=lost")
	require.Equal(t, http.StatusOK, code, "GET /write on a full disk: %q", body)
	require.Equal(t, "written", body, "GET /write on a full disk")
	require.True(t, logs.await("cannot write its err output", 30*time.Second), "the parent did not report the lost lines; its log:\n%s", logs)
	assert.Contains(t, logs.String(), "no space left on device", "the report does not name the cause")
	assert.Contains(t, logs.String(), `\"logsc-writer\"`, "the report does not name the module")
	code, body = fetch(t, srv.URL+"/")
	assert.Equal(t, http.StatusOK, code, "GET / with the disk full: %q", body)
	assert.Equal(t, "ok", body, "GET / with the disk full")

	require.NoError(t, os.Remove(filepath.Join(dir, "filler")))
	code, body = fetch(t, srv.URL+"/write?n=3&tag=kept")
	require.Equal(t, http.StatusOK, code, "GET /write after freeing space: %q", body)
	require.Equal(t, "written", body, "GET /write after freeing space")
	require.True(t, logs.await("writing its err output again", 30*time.Second), "the parent did not report that writing resumed; its log:\n%s", logs)
	m := regexp.MustCompile(`lines lost while it failed: (\d+)`).FindStringSubmatch(logs.String())
	require.NotNil(t, m, "the report of recovery does not count the lost lines:\n%s", logs)
	errFile := filepath.Join(dir, "logsc-writer.err")
	var text string
	waitFor(t, 30*time.Second, "the lines written after space returned", func() bool {
		b, _ := os.ReadFile(errFile)
		text = string(b)
		return strings.HasSuffix(text, "kept 0\nkept 1\nkept 2\n")
	})
	// The parent may still be copying the 1000 lines when the space
	// returns: each of them is either lost, and counted, or in the file.
	lost, _ := strconv.Atoi(m[1])
	kept := strings.Count(text, "lost ")
	assert.GreaterOrEqual(t, lost, 1, "the parent reports %d lines lost, and %d are in the file; want at least one lost", lost, kept)
	assert.Equal(t, 1000, lost+kept, "the parent reports %d lines lost, and %d are in the file; want 1000 in all", lost, kept)
	st := h.Stats()
	assert.Zero(t, st.Restarts, "the module was restarted %d times, want it served throughout", st.Restarts)
	t.Logf("the parent's log:\n%s", logs)
}

// fill writes to path until its file system is full: in smaller and
// smaller writes, for a tmpfs may refuse a large write (that wants a large
// folio) yet have room for a small one.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 64<<10)
	for size := len(buf); size > 0; size /= 2 {
		for {
			if _, err := f.Write(buf[:size]); err != nil {
				require.ErrorIs(t, err, syscall.ENOSPC, "filling the file system: %v", err)
				break
			}
		}
	}
}

// TestLogsPrefixEscapesControls checks that without LogDir a module's
// control characters reach Options.Stderr escaped, so that its lines
// cannot move the cursor or forge another module's line.
func TestLogsPrefixEscapesControls(t *testing.T) {
	var out logSink
	h := startModule(t, "logsc-forger", Options{Stderr: &out})
	require.NoError(t, h.Close())
	text := out.String()
	for _, want := range []string{
		`[logsc-forger] \x1b[1A\x1b[2K\r[logsc-other] forged` + "\n",
		`[logsc-forger] half\rwritten\u009b\x7f\xff` + "\n",
	} {
		assert.Contains(t, text, want, "output lacks %q:\n%q", want, text)
	}
	i := strings.IndexAny(text, "\x1b\r\x7f\u009b")
	assert.Less(t, i, 0, "output holds a control character at %d: %q", i, text)
}
