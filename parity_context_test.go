package subproc

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The client goes away: what the handler's context says.
func TestParityContextClientGone(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		for _, flush := range []bool{false, true} {
			t.Run(fmt.Sprint("h2=", h2, ",flush=", flush), func(t *testing.T) {
				tgs := parTargets(t, h2)
				var outs []string
				for i, tg := range tgs {
					k := fmt.Sprintf("gone%d", i)
					ctx, cancel := context.WithCancel(context.Background())
					q := "/ctx?k=" + k
					if flush {
						q += "&flush=1"
					}
					req, _ := http.NewRequestWithContext(ctx, "GET", tg.url+q, nil)
					done := make(chan struct{})
					go func() {
						defer close(done)
						res, err := tg.client.Do(req)
						if err == nil {
							res.Body.Close()
						}
					}()
					_, _, err := parGet(t, tg, "/get?k="+k+"-started")
					require.NoError(t, err)
					cancel()
					<-done
					_, s, err := parGet(t, tg, "/get?k="+k)
					require.NoError(t, err)
					outs = append(outs, s)
				}
				assert.Equal(t, outs[0], outs[1])
			})
		}
	}
}

// A deadline set by a middleware in front: what the handler's context says.
func TestParityContextDeadline(t *testing.T) {
	h := startModule(t, "parity", Options{HealthInterval: time.Hour})
	mw := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/ctx" {
				ctx, cancel := context.WithTimeout(r.Context(), 30*time.Millisecond)
				defer cancel()
				r = r.WithContext(ctx)
			}
			next.ServeHTTP(w, r)
		})
	}
	in := httptest.NewServer(mw(parMux()))
	defer in.Close()
	sp := httptest.NewServer(mw(h))
	defer sp.Close()
	counts := map[string]map[string]int{}
	for name, u := range map[string]string{"net/http": in.URL, "subproc": sp.URL} {
		counts[name] = map[string]int{}
		for i := range 30 {
			k := fmt.Sprintf("dl%d", i)
			fetchErr(u+"/ctx?k="+k, fetchTimeout)
			_, s, err := fetchErr(u+"/get?k="+k, fetchTimeout)
			require.NoError(t, err)
			counts[name][s]++
		}
	}
	t.Logf("%v", counts)
	for s := range counts["subproc"] {
		assert.Contains(t, s, "err=context deadline exceeded", "subproc: %v", counts["subproc"])
	}
}

// A client that half-closes its connection once it has sent its request
// (as "nc -N" and HTTP/1.0 tools do) reads the handler's answer, as
// in-process: net/http cancels the request's context at the half-close,
// but delivers what the handler writes after. The parent used to answer
// 503 "request canceled" itself.
func TestParityContextHalfClosedClient(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for _, tg := range tgs {
		conn, err := halfClosedConn(tg.srv.Listener.Addr().String(), "/answer-at-end")
		require.NoError(t, err)
		defer conn.Close()
		b, err := io.ReadAll(conn)
		require.NoError(t, err, "%s: reading the answer", tg.name)
		outs = append(outs, regexp.MustCompile(`\r\nDate: [^\r]*`).ReplaceAllString(string(b), ""))
	}
	require.Contains(t, outs[0], "err=context canceled", "in-process, the half-close cancels the context")
	assert.Equal(t, outs[0], outs[1])
}
