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
	if code, body := fetch(t, srv.URL+"/first"); code != 200 || body != "0" {
		t.Fatalf("first request: %d %q", code, body)
	}
	syscall.Kill(h.Stats().Pid, syscall.SIGKILL)
	awaitStats(t, h, 20*time.Second, "incarnation 1 running", runningInc(1))
	if code, body := fetch(t, srv.URL+"/second"); code != 200 || body != "1" {
		t.Fatalf("second request: %d %q", code, body)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}

	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	logText := read("logs-writer.log")
	// slog's text format: time, level, source file:line, message.
	record := regexp.MustCompile(`(?m)^time=\S+ level=(INFO|WARN) source=\S+logs_test\.go:\d+ msg=(\w+) `)
	var msgs []string
	for _, m := range record.FindAllStringSubmatch(logText, -1) {
		msgs = append(msgs, m[2])
	}
	if want := []string{"init", "serving", "init", "serving"}; strings.Join(msgs, ",") != strings.Join(want, ",") {
		t.Errorf("log records %q, want %q; log:\n%s", msgs, want, logText)
	}
	for _, want := range []string{"incarnation=0", "incarnation=1", "path=/first", "path=/second"} {
		if !strings.Contains(logText, want) {
			t.Errorf("log lacks %q:\n%s", want, logText)
		}
	}
	if out, want := read("logs-writer.out"), "stdout at init 0\nraw fd 1 at init 0\nstdout at init 1\nraw fd 1 at init 1\n"; out != want {
		t.Errorf("stdout file:\n%s\nwant:\n%s", out, want)
	}
	if errText := read("logs-writer.err"); !strings.Contains(errText, "stderr at init 0\n") || !strings.Contains(errText, "stderr at init 1\n") {
		t.Errorf("stderr file lacks an incarnation's line:\n%s", errText)
	}
}

func TestLogsWithoutLogDirArePrefixed(t *testing.T) {
	var out logSink
	h := startModule(t, "logs-writer", Options{Stderr: &out})
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{
		"[logs-writer] stdout at init 0\n",
		"[logs-writer] stderr at init 0\n",
		"[logs-writer] raw fd 1 at init 0\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	if !regexp.MustCompile(`(?m)^\[logs-writer\] time=\S+ level=INFO source=\S+:\d+ msg=init incarnation=0$`).MatchString(text) {
		t.Errorf("output lacks the prefixed log record:\n%s", text)
	}
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if !strings.HasPrefix(line, "[logs-writer] ") {
			t.Errorf("unprefixed line %q", line)
		}
	}
}
