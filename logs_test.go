package subproc

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	Register("logs-writer", func(ctx context.Context, env *Env) (http.Handler, error) {
		env.Logger.Info("init", "incarnation", env.Incarnation)
		fmt.Printf("stdout at init %d\n", env.Incarnation)
		fmt.Fprintf(os.Stderr, "stderr at init %d\n", env.Incarnation)
		syscall.Write(1, []byte(fmt.Sprintf("raw fd 1 at init %d\n", env.Incarnation)))
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			env.Logger.Warn("serving", "path", r.URL.Path, "incarnation", env.Incarnation)
			fmt.Fprintf(w, "%d", env.Incarnation)
		}), nil
	})
}

func TestLogFilesAcrossIncarnations(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "logs-writer", Options{LogDir: dir})
	srv := serve(t, h)
	code, body := fetch(t, srv.URL+"/first")
	require.Equal(t, http.StatusOK, code, "first request: %q", body)
	require.Equal(t, "0", body, "first request")
	syscall.Kill(h.Stats().Pid, syscall.SIGKILL)
	awaitStats(t, h, 20*time.Second, "incarnation 1 running", runningInc(1))
	code, body = fetch(t, srv.URL+"/second")
	require.Equal(t, http.StatusOK, code, "second request: %q", body)
	require.Equal(t, "1", body, "second request")
	require.NoError(t, h.Close())

	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		require.NoError(t, err)
		return string(b)
	}
	logText := read("logs-writer.log")
	// slog's text format: time, level, source file:line, message.
	record := regexp.MustCompile(`(?m)^time=\S+ level=(INFO|WARN) source=\S+logs_test\.go:\d+ msg=(\w+) `)
	var msgs []string
	for _, m := range record.FindAllStringSubmatch(logText, -1) {
		msgs = append(msgs, m[2])
	}
	assert.Equal(t, []string{"init", "serving", "init", "serving"}, msgs, "log records; log:\n%s", logText)
	for _, want := range []string{"incarnation=0", "incarnation=1", "path=/first", "path=/second"} {
		assert.Contains(t, logText, want, "log lacks %q:\n%s", want, logText)
	}
	assert.Equal(t, "stdout at init 0\nraw fd 1 at init 0\nstdout at init 1\nraw fd 1 at init 1\n", read("logs-writer.out"), "stdout file")
	errText := read("logs-writer.err")
	assert.Contains(t, errText, "stderr at init 0\n", "stderr file lacks incarnation 0's line")
	assert.Contains(t, errText, "stderr at init 1\n", "stderr file lacks incarnation 1's line")
}

func TestLogsWithoutLogDirArePrefixed(t *testing.T) {
	var out logSink
	h := startModule(t, "logs-writer", Options{Stderr: &out})
	require.NoError(t, h.Close())
	text := out.String()
	for _, want := range []string{
		"[logs-writer] stdout at init 0\n",
		"[logs-writer] stderr at init 0\n",
		"[logs-writer] raw fd 1 at init 0\n",
	} {
		assert.Contains(t, text, want, "output lacks %q:\n%s", want, text)
	}
	assert.Regexp(t, `(?m)^\[logs-writer\] time=\S+ level=INFO source=\S+:\d+ msg=init incarnation=0$`, text, "output lacks the prefixed log record")
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		assert.True(t, strings.HasPrefix(line, "[logs-writer] "), "unprefixed line %q", line)
	}
}
