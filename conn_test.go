package subproc

import (
	"bytes"
	"encoding/binary"
	"io"
	"sync"
	"testing"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestConnLargePendingKeepsFrames: frames appended while a write is under
// way reach the pipe intact and whole even when what is pending grows past
// the buffer the writer keeps for reuse (2 × maxPending), as a head of
// megabytes, or many batches appended at once, make it. The writer once
// kept reusing the buffer it was writing from then, and the frames
// appended meanwhile overwrote bytes on their way to the pipe.
func TestConnLargePendingKeepsFrames(t *testing.T) {
	pr, pw := io.Pipe()
	c := newConn(nil, pw)
	const senders, batches, perBatch = 8, 20, 4
	payload := func(sender, seq int) []byte {
		p := bytes.Repeat([]byte{byte(sender), byte(seq)}, (chunkSize-64)/2)
		binary.BigEndian.PutUint32(p, uint32(sender<<16|seq))
		return p
	}
	var wg sync.WaitGroup
	for s := range senders {
		wg.Go(func() {
			for b := range batches {
				var fs []outFrame
				for i := range perBatch {
					fs = append(fs, outFrame{kind: kindData, id: uint64(s + 1), data: payload(s, b*perBatch+i)})
				}
				assert.NoError(t, c.sendFrames(fs, nil))
			}
		})
	}
	read := make(chan error, 1)
	go func() {
		defer pr.Close()
		fr := frame.NewReader(pr, readBufferSize)
		if err := frame.ReadPreamble(fr.Buffered(), protocolVersion); err != nil {
			read <- err
			return
		}
		next := make([]int, senders)
		p := make([]byte, chunkSize)
		for range senders * batches * perBatch {
			hdr, err := fr.ReadHeader()
			if err != nil {
				read <- err
				return
			}
			s := int(hdr.ID) - 1
			if hdr.Kind != kindData || s < 0 || s >= senders || hdr.Len != uint32(len(payload(0, 0))) {
				read <- &protocolError{"bad frame header"}
				return
			}
			if err := fr.ReadPayload(p[:hdr.Len]); err != nil {
				read <- err
				return
			}
			if !bytes.Equal(p[:hdr.Len], payload(s, next[s])) {
				read <- &protocolError{"frame payload changed on its way"}
				return
			}
			next[s]++
		}
		read <- nil
	}()
	wg.Wait()
	require.NoError(t, <-read)
}
