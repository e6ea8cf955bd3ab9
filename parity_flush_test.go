package subproc

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParityDuplexInterleaved(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprint("h2=", h2), func(t *testing.T) {
			for _, tg := range parTargets(t, h2) {
				pr, pw := io.Pipe()
				ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
				defer cancel()
				req, _ := http.NewRequestWithContext(ctx, "POST", tg.url+"/duplex", pr)
				res, err := tg.client.Do(req)
				require.NoError(t, err, tg.name)
				br := bufio.NewReader(res.Body)
				for i := range 20 {
					fmt.Fprintf(pw, "line%d\n", i)
					l, err := br.ReadString('\n')
					require.NoError(t, err, tg.name)
					require.Equal(t, fmt.Sprintf("echo line%d\n", i), l, tg.name)
				}
				pw.Close()
				rest, err := io.ReadAll(br)
				assert.NoError(t, err, tg.name)
				assert.Empty(t, rest)
				res.Body.Close()
			}
		})
	}
}

// A handler that ends when Flush fails, as SSE handlers do, after its
// client went away.
func TestParityFlushFailsAfterClientGone(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprint("h2=", h2), func(t *testing.T) {
			tgs := parTargets(t, h2)
			var outs []string
			for i, tg := range tgs {
				k := fmt.Sprintf("fo%d", i)
				ctx, cancel := context.WithCancel(context.Background())
				req, _ := http.NewRequestWithContext(ctx, "GET", tg.url+"/flush-only?k="+k, nil)
				res, err := tg.client.Do(req)
				require.NoError(t, err)
				_, _, err = parGet(t, tg, "/get?k="+k+"-started")
				require.NoError(t, err)
				cancel()
				res.Body.Close()
				_, s, err := parGet(t, tg, "/get?k="+k)
				require.NoError(t, err)
				outs = append(outs, s)
			}
			assert.Equal(t, []string{"flush failed", "flush failed"}, outs)
		})
	}
}
