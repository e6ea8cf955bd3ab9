package subproc

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// Two requests whose ids were issued 1, 2 but whose frames reach the pipe
// as 2, 1 (open sends after releasing c.mu). Both handlers run.
func TestScratchAcceptWordGoesBackwards(t *testing.T) {
	var started sync.WaitGroup
	started.Add(2)
	release := make(chan struct{})
	p := newPipePair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started.Done()
		<-release
	}))
	c := p.c
	r := httptest.NewRequest("GET", "/", nil)
	head := newRequestHead(r)
	c.mu.Lock()
	s1 := newStream(c.nextID+1, window)
	s2 := newStream(c.nextID+2, window)
	c.nextID += 2
	c.pending[s1.id], c.pending[s2.id] = s1, s2
	c.mu.Unlock()
	// goroutine B (id 2) appends first, then goroutine A (id 1)
	c.send(outFrame{kind: kindRequest, flags: flagNoBody, id: s2.id, msg: head}, nil)
	c.send(outFrame{kind: kindRequest, flags: flagNoBody, id: s1.id, msg: head}, nil)
	started.Wait() // both handlers are running: the module saw both requests
	t.Logf("accept word = %d", c.accept.load())
	c.fail(errChildExited, true) // the child dies now
	_, err := s2.next(nil)
	var nd *notDeliveredError
	if errors.As(err, &nd) {
		t.Errorf("request %d, whose handler ran, fails as not delivered: the parent would retry it on the next child", s2.id)
	}
	close(release)
}
