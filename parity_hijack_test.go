package subproc

import (
	"bufio"
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

// parDial sends an upgrade request for path, followed by pipelined, and
// returns the conn and a reader past the 101 head.
func parDial(t *testing.T, tg parTarget, path, pipelined string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(tg.url, "http://"))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: parity\r\n\r\n%s", path, pipelined)
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	require.NoError(t, err, tg.name)
	require.Equal(t, 101, res.StatusCode, tg.name)
	return c, br
}

func TestParityHijackRCReadDeadlineAfter(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for _, tg := range tgs {
		_, br := parDial(t, tg, "/hj-rdl-after", "")
		l, err := br.ReadString('\n')
		require.NoError(t, err, tg.name)
		outs = append(outs, l)
	}
	assert.Equal(t, outs[0], outs[1], "ResponseController.SetReadDeadline after Hijack: net/http vs subproc")
}

func TestParityHijackCloseWrite(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for i, tg := range tgs {
		c, br := parDial(t, tg, fmt.Sprintf("/hj-closewrite?k=%d", i), "")
		got, err := io.ReadAll(br)
		assert.NoError(t, err, tg.name)
		assert.Equal(t, "bye", string(got), tg.name)
		io.WriteString(c, "client-data")
		c.(*net.TCPConn).CloseWrite()
		_, s, err := parGet(t, tg, fmt.Sprintf("/get?k=hj-closewrite%d", i))
		require.NoError(t, err)
		outs = append(outs, s)
	}
	assert.Equal(t, outs[0], outs[1])
}

func TestParityHijackCloseRead(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for i, tg := range tgs {
		parDial(t, tg, fmt.Sprintf("/hj-close-read?k=%d", i), "")
		_, s, err := parGet(t, tg, fmt.Sprintf("/get?k=hj-close-read%d", i))
		require.NoError(t, err)
		outs = append(outs, s)
	}
	assert.Equal(t, outs[0], outs[1])
}

func TestParityHijackDeadlines(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for i, tg := range tgs {
		c, br := parDial(t, tg, fmt.Sprintf("/hj-deadlines?k=%d", i), "")
		l, err := br.ReadString('\n')
		require.NoError(t, err, tg.name)
		require.Equal(t, "send\n", l)
		io.WriteString(c, "Z")
		l, err = br.ReadString('\n')
		require.NoError(t, err, tg.name)
		outs = append(outs, l)
		_, s, _ := parGet(t, tg, fmt.Sprintf("/get?k=hj-deadlines%d", i))
		t.Logf("%s: %s final write %s", tg.name, l, s)
	}
	assert.Equal(t, outs[0], outs[1])
}

// A client that stops reading, then closes, while the module writes a lot.
func TestParityHijackBigWriteClientCloses(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for i, tg := range tgs {
		c, br := parDial(t, tg, fmt.Sprintf("/hj-big?k=%d", i), "")
		io.ReadFull(br, make([]byte, 3<<20))
		c.Close()
		_, s, err := parGet(t, tg, fmt.Sprintf("/get?k=hj-big%d", i))
		require.NoError(t, err)
		outs = append(outs, s)
	}
	assert.Equal(t, outs[0], outs[1])
}

func TestParityHijackReadDeadlinePassedWithDataQueued(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for _, tg := range tgs {
		c, br := parDial(t, tg, "/hj-rdl-queued", "")
		io.WriteString(c, "QR")
		l, err := br.ReadString('\n')
		require.NoError(t, err, tg.name)
		outs = append(outs, l)
	}
	assert.Equal(t, outs[0], outs[1], "a read of a hijacked conn whose read deadline has passed")
}

func TestParityHijackRCWriteDeadlineAfter(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for _, tg := range tgs {
		_, br := parDial(t, tg, "/hj-wdl-after", "")
		l, err := br.ReadString('\n')
		require.NoError(t, err, tg.name)
		outs = append(outs, l)
	}
	assert.Equal(t, outs[0], outs[1], "ResponseController.SetWriteDeadline after Hijack")
}

func TestParityHijackBufferedBytes(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for _, tg := range tgs {
		_, br := parDial(t, tg, "/hj-buffered", "HELLO")
		l, err := br.ReadString('\n')
		require.NoError(t, err)
		outs = append(outs, l)
	}
	assert.Equal(t, outs[0], outs[1])
}

func TestParityHijackConcurrentClose(t *testing.T) {
	tgs := parTargets(t, false)
	var outs []string
	for i, tg := range tgs {
		c, _ := parDial(t, tg, fmt.Sprintf("/hj-race?k=%d", i), "")
		go io.Copy(io.Discard, c)
		go func() {
			for {
				if _, err := c.Write(make([]byte, 4096)); err != nil {
					return
				}
			}
		}()
		_, s, err := parGet(t, tg, fmt.Sprintf("/get?k=hj-race%d", i))
		require.NoError(t, err)
		outs = append(outs, s)
	}
	t.Log(outs)
	// The blocked write fails as closed or timed out, as on a TCP conn, not
	// with a reset.
	assert.Regexp(t, `^close=<nil> read: .*closed=true.* \| write: (deadline=true|.*closed=true)`, outs[1])
}
