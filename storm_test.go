package subproc

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// While the child is killed again and again, concurrent requests get either
// their own, complete answer or an honest failure (a 5xx, or an aborted
// body): never another request's bytes, never a hang, never another status.
func TestKillStormNoWrongAnswers(t *testing.T) {
	h := startModule(t, "bench", Options{Logger: discardLogger(), RestartWait: 5 * time.Second})
	srv := serve(t, h)
	client := &http.Client{Timeout: 20 * time.Second}
	var ok, s5xx, wrong, errs, other atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			body := make([]byte, 64<<10+i)
			rand.Read(body)
			for {
				select {
				case <-stop:
					return
				default:
				}
				var res *http.Response
				var err error
				if i%2 == 0 {
					res, err = client.Post(srv.URL+"/echo", "x", bytes.NewReader(body))
				} else {
					res, err = client.Get(srv.URL + "/stream?bytes=300000")
				}
				if err != nil {
					errs.Add(1)
					continue
				}
				b, rerr := io.ReadAll(res.Body)
				res.Body.Close()
				switch {
				case res.StatusCode >= 500:
					s5xx.Add(1)
				case res.StatusCode != 200:
					other.Add(1)
				case rerr != nil:
					errs.Add(1)
				case i%2 == 0 && !bytes.Equal(b, body):
					wrong.Add(1)
					t.Logf("echo: got %d bytes, want %d; header %v", len(b), len(body), res.Header)
				case i%2 == 1 && len(b) != 300000:
					wrong.Add(1)
					t.Logf("stream: got %d bytes; header %v", len(b), res.Header)
				default:
					ok.Add(1)
				}
			}
		}(i)
	}
	deadline := time.Now().Add(3 * time.Second)
	kills := 0
	for time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond) // the pace of the kills, not a synchronization
		if pid := h.Stats().Pid; pid != 0 {
			syscall.Kill(pid, syscall.SIGKILL)
			kills++
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("kills %d ok %d 5xx %d wrong %d errs %d other %d stats %+v", kills, ok.Load(), s5xx.Load(), wrong.Load(), errs.Load(), other.Load(), h.Stats())
	client.CloseIdleConnections()
	if wrong.Load() > 0 || other.Load() > 0 {
		t.Errorf("%d wrong bodies and %d unexpected statuses", wrong.Load(), other.Load())
	}
	if ok.Load() == 0 {
		t.Error("no request succeeded")
	}
	// The module serves again after the storm.
	deadline = time.Now().Add(20 * time.Second)
	for h.Stats().State != "running" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond) // another process's progress: poll
	}
	if _, err := h.HealthCheck(context.Background()); err != nil {
		t.Errorf("after the storm: %v", err)
	}
}
