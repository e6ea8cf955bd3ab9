package subproc

import (
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// A pool of four with one child SIGKILLed every second, under load: only
// requests in flight on the killed child fail, and none gets a 503, as the
// other children serve throughout. With -chaos: 64 clients for 30s.
func TestChaosPoolKills(t *testing.T) {
	clients := chaosN(16, 64)
	dur := chaosN(4*time.Second, 30*time.Second)
	h := startModule(t, "pool-mod", Options{Children: 4, HealthInterval: time.Hour})
	srv := httptest.NewServer(h)
	defer srv.Close()
	client := chaosClient(clients)
	defer client.CloseIdleConnections()

	var ok, bad, unavailable, other atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				res, err := client.Get(srv.URL + "/id")
				if err != nil {
					other.Add(1) // an aborted connection
					continue
				}
				b, err := io.ReadAll(res.Body)
				res.Body.Close()
				switch {
				case err != nil:
					other.Add(1)
				case res.StatusCode == http.StatusOK && strings.HasPrefix(string(b), "pid="):
					ok.Add(1)
				case res.StatusCode == http.StatusBadGateway:
					bad.Add(1)
				case res.StatusCode == http.StatusServiceUnavailable:
					unavailable.Add(1)
				default:
					other.Add(1)
				}
			}
		})
	}
	kills := 0
	tick := time.NewTicker(time.Second)
	for end := time.Now().Add(dur); time.Now().Before(end); {
		<-tick.C // the pace of the kills
		pids := poolPids(h)
		if len(pids) == 0 {
			continue
		}
		slots := make([]int, 0, len(pids))
		for s := range pids {
			slots = append(slots, s)
		}
		if syscall.Kill(pids[slots[rand.IntN(len(slots))]], syscall.SIGKILL) == nil {
			kills++
		}
	}
	tick.Stop()
	close(stop)
	wg.Wait()
	total := ok.Load() + bad.Load() + unavailable.Load() + other.Load()
	failed := bad.Load() + other.Load()
	t.Logf("pool of 4, %d clients, %v: %d requests, %d kills; %d 200, %d 502, %d 503, %d other (%.3f%% failed, %.1f per kill)",
		clients, dur, total, kills, ok.Load(), bad.Load(), unavailable.Load(), other.Load(),
		100*float64(failed)/float64(max(total, 1)), float64(failed)/float64(max(kills, 1)))
	assert.Zero(t, unavailable.Load(), "the other children serve: no request should wait in vain")
	// A kill fails at most the requests in flight on that child: about a
	// quarter of the clients'.
	assert.LessOrEqual(t, failed, int64(kills*(clients/4+2)), "more requests failed than the killed children had in flight")
	assert.Positive(t, ok.Load())
}
