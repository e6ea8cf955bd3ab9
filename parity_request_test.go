package subproc

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func parInfo(t *testing.T, tg parTarget, req *http.Request) map[string]any {
	t.Helper()
	res, err := tg.client.Do(req)
	require.NoError(t, err, tg.name)
	defer res.Body.Close()
	var m map[string]any
	require.NoError(t, json.NewDecoder(res.Body).Decode(&m), tg.name)
	return m
}

func TestParityInfoH2(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprint("h2=", h2), func(t *testing.T) {
			tgs := parTargets(t, h2)
			var ms []map[string]any
			for _, tg := range tgs {
				pr, pw := io.Pipe()
				go func() { io.WriteString(pw, "hello"); pw.Close() }()
				req, _ := http.NewRequest("POST", tg.url+"/info?a=b", pr)
				req.Header.Set("X-A", "1")
				ms = append(ms, parInfo(t, tg, req))
			}
			for k, v := range ms[0] {
				if k == "RemoteAddr" || k == "Host" || k == "URLHost" {
					continue
				}
				assert.Equal(t, v, ms[1][k], "field %s", k)
			}
			t.Logf("net/http: %v", ms[0])
			t.Logf("subproc:  %v", ms[1])
		})
	}
}

// rawReq sends raw on a new connection and returns the response.
func parRaw(t *testing.T, addr, raw string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, raw)
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

func TestParityInfoAbsoluteForm(t *testing.T) {
	tgs := parTargets(t, false)
	var ms []map[string]any
	for _, tg := range tgs {
		addr := strings.TrimPrefix(tg.url, "http://")
		body := parRaw(t, addr, "GET http://example.com:8080/info?q=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(body), &m), body)
		ms = append(ms, m)
	}
	delete(ms[0]["Header"].(map[string]any), "Connection") // hop-by-hop: removed (README)
	for k, v := range ms[0] {
		if k == "RemoteAddr" {
			continue
		}
		assert.Equal(t, v, ms[1][k], "field %s", k)
	}
	t.Logf("net/http: %v", ms[0])
	t.Logf("subproc:  %v", ms[1])
}
