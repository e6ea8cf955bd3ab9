package subproc

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Requests may reach the child in another order than their ids were issued
// (open queues a request's frame after it releases the child's lock). The
// accept word must still cover every request whose handler ran, or the
// parent, if the child died, would run such a request again on the next
// child. Found by the chaos suite and a review: the word went from 2 back
// to 1.
func TestAcceptWordNeverGoesBackwards(t *testing.T) {
	var started sync.WaitGroup
	started.Add(2)
	release := make(chan struct{})
	p := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started.Done()
		<-release
	}))
	c := p.c
	head := newRequestHead(httptest.NewRequest("GET", "/", nil))
	c.mu.Lock()
	s1 := newStream(c.nextID+1, window)
	s2 := newStream(c.nextID+2, window)
	c.nextID += 2
	c.pending[s1.id], c.pending[s2.id] = s1, s2
	c.mu.Unlock()
	// The goroutine that opened request 2 queues it first.
	c.send(outFrame{kind: kindRequest, flags: flagNoBody, id: s2.id, msg: head}, nil)
	c.send(outFrame{kind: kindRequest, flags: flagNoBody, id: s1.id, msg: head}, nil)
	started.Wait() // both handlers run: the module saw both requests
	got := c.accept.load()
	assert.GreaterOrEqual(t, got, s2.id, "accept word is %d with the handler of request %d running: if the child died, the parent would run it again", got, s2.id)
	close(release)
	for _, s := range []*stream{s1, s2} {
		st, _ := readAll(t, c, s)
		assert.Equal(t, http.StatusOK, st, "request %d: status", s.id)
	}
}

// gatedWriter accepts its first write once released, and fails the others.
type gatedWriter struct {
	writing chan struct{} // closed when the first write begins
	release chan struct{}
	writes  int
}

func (w *gatedWriter) Write(p []byte) (int, error) {
	w.writes++
	if w.writes > 1 {
		return 0, syscall.EPIPE
	}
	close(w.writing)
	<-w.release
	return len(p), nil
}

func (w *gatedWriter) Close() error { return nil }

// A sender whose frames were written is not told of a failure of the
// frames that others appended after them: for a request, the parent would
// take that for "never sent" and run it again on the next child, though
// the child may have read it, run it and died of it.
func TestSendIsNotBlamedForLaterFrames(t *testing.T) {
	w := &gatedWriter{writing: make(chan struct{}), release: make(chan struct{})}
	c := newConn(strings.NewReader(""), w)
	first := make(chan error, 1)
	go func() { first <- c.send(outFrame{kind: kindPing, id: 1}, nil) }()
	<-w.writing // the first sender writes its frame, and goes on writing
	require.NoError(t, c.send(outFrame{kind: kindPing, id: 2}, nil), "a frame appended behind a write")
	close(w.release)
	assert.NoError(t, <-first, "the sender whose frame was written got the error of another's write")
	assert.Error(t, c.send(outFrame{kind: kindPing, id: 3}, nil), "a send after the pipe failed succeeded")
}
