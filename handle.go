package subproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/fbbf71ac/subproc/internal/logcapture"
)

// Options configures a module started by Start. The zero value of each field
// selects the default documented on it. Start copies the Options; changing
// them afterwards has no effect.
type Options struct {
	// Config is handed to the module as Env.Config, byte for byte.
	Config []byte

	// LogDir is where the module's log files go: <LogDir>/<name>.log holds
	// Env.Logger's records, <name>.out and <name>.err what the module writes
	// to its stdout and stderr. Every incarnation appends; files rotate by
	// size. If LogDir is "", all three go to Stderr, each line prefixed with
	// "[<name>] ". Use one Handle per module name and LogDir.
	LogDir string

	// LogMaxSize is the size in megabytes at which a log file is rotated.
	// Zero means 100.
	LogMaxSize int

	// LogMaxBackups is how many rotated files of each log are kept. Zero
	// means 5; a negative value keeps them all.
	LogMaxBackups int

	// Stderr receives the module's output when LogDir is "". Nil means
	// os.Stderr.
	Stderr io.Writer

	// Logger receives the parent's records about the module: its starts,
	// exits, restarts, failed health checks and broken messages. Nil means
	// slog.Default().
	Logger *slog.Logger

	// StartTimeout bounds how long a child may take to become ready: to run
	// its ModuleFunc and report. Zero means 30s.
	StartTimeout time.Duration

	// HealthInterval is the time between two health checks of a running
	// child. Zero means 1s.
	HealthInterval time.Duration

	// HealthTimeout is how long a health check waits for the child's answer.
	// Zero means 2s.
	HealthTimeout time.Duration

	// HealthFailures is how many health checks in a row must fail before the
	// child is killed and restarted. Zero means 3.
	HealthFailures int

	// RestartWait bounds how long a request that arrives while the module
	// restarts waits for the new child. After it, the request gets 503
	// Service Unavailable with a Retry-After header. Zero means 10s; a
	// negative value means requests do not wait.
	RestartWait time.Duration

	// MaxRestartDelay caps the delay between restarts of a module that keeps
	// failing. A child that dies after answering a request or a health check
	// is restarted at once; each further child that dies (or fails to start)
	// before answering anything doubles the delay, from 100ms up to
	// MaxRestartDelay. Zero means 10s.
	MaxRestartDelay time.Duration

	// ShutdownTimeout is the grace period Close gives in-flight requests
	// before it kills the child. Zero means 10s.
	ShutdownTimeout time.Duration
}

// withDefaults returns o with every zero field set to its default.
func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&o.StartTimeout, 30*time.Second)
	def(&o.HealthInterval, time.Second)
	def(&o.HealthTimeout, 2*time.Second)
	def(&o.RestartWait, 10*time.Second)
	def(&o.MaxRestartDelay, 10*time.Second)
	def(&o.ShutdownTimeout, 10*time.Second)
	if o.RestartWait < 0 {
		o.RestartWait = 0
	}
	if o.HealthFailures == 0 {
		o.HealthFailures = 3
	}
	if o.LogMaxSize == 0 {
		o.LogMaxSize = 100
	}
	switch {
	case o.LogMaxBackups == 0:
		o.LogMaxBackups = 5
	case o.LogMaxBackups < 0:
		o.LogMaxBackups = 0 // lumberjack keeps all
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

func (o Options) validate() error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"StartTimeout", o.StartTimeout},
		{"HealthInterval", o.HealthInterval},
		{"HealthTimeout", o.HealthTimeout},
		{"MaxRestartDelay", o.MaxRestartDelay},
		{"ShutdownTimeout", o.ShutdownTimeout},
	} {
		if d.v < 0 {
			return fmt.Errorf("Options.%s is negative (%v)", d.name, d.v)
		}
	}
	if o.HealthFailures < 0 {
		return fmt.Errorf("Options.HealthFailures is negative (%d)", o.HealthFailures)
	}
	if o.LogMaxSize < 0 {
		return fmt.Errorf("Options.LogMaxSize is negative (%d)", o.LogMaxSize)
	}
	return nil
}

// Errors that Start and Handle methods return, wrapped so that they name the
// module. Test for them with errors.Is.
var (
	// ErrNotRegistered: Start was given a name that Register never saw.
	ErrNotRegistered = errors.New("subproc: module not registered")

	// ErrStartTimeout: the child did not become ready within StartTimeout.
	ErrStartTimeout = errors.New("subproc: module not ready in time")

	// ErrClosed: the handle is shut down, or shutting down.
	ErrClosed = errors.New("subproc: handle closed")

	// ErrUnavailable: no child is running right now (the module is
	// restarting).
	ErrUnavailable = errors.New("subproc: module unavailable")
)

// A StartError reports why a module's child could not be started. Start
// returns one; so does a restart, in the parent's log.
type StartError struct {
	Module string   // the module's name
	Err    error    // what went wrong; the module's own error if its ModuleFunc failed
	Output []string // the last lines the child wrote to its stderr, stdout and log
}

func (e *StartError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "subproc: module %q ", e.Module)
	var ie *initError
	switch {
	case errors.Is(e.Err, ErrNotRegistered):
		fmt.Fprintf(&b, "is not registered: call subproc.Register(%q, fn) from an init function or from main before subproc.Main, in the program that calls Start", e.Module)
	case errors.As(e.Err, &ie):
		fmt.Fprintf(&b, "failed to initialise: %s", ie.msg)
	case errors.Is(e.Err, ErrStartTimeout):
		fmt.Fprintf(&b, "was not ready in time: its ModuleFunc did not return within Options.StartTimeout; make it return sooner or raise the timeout")
	case errors.Is(e.Err, frame.ErrNotProtocol):
		fmt.Fprintf(&b, "could not start: the child wrote something other than the subproc protocol to its stdout; make subproc.Main() the first statement of main (and of TestMain), before anything that prints")
	default:
		fmt.Fprintf(&b, "could not start: %v", e.Err)
	}
	if len(e.Output) > 0 {
		b.WriteString("\nlast output of the child:")
		for _, l := range e.Output {
			b.WriteString("\n\t")
			b.WriteString(l)
		}
	}
	return b.String()
}

func (e *StartError) Unwrap() error { return e.Err }

// A Handle runs one module in a child process and forwards HTTP requests to
// it. It restarts the child when the child exits or stops answering health
// checks. A Handle is safe for concurrent use. After Start has returned a
// Handle, Shutdown or Close must be called to stop the child and release the
// goroutines that watch it.
type Handle struct {
	name      string              // fixed
	opts      Options             // fixed, with defaults applied
	capture   *logcapture.Capture // fixed
	spawns    chan spawnRequest   // to spawnLoop; closed by superviseLoop when it returns
	life      context.Context     // fixed; canceled when Shutdown begins
	endLife   context.CancelFunc  // fixed
	closing   chan struct{}       // closed when Shutdown begins
	kill      chan struct{}       // closed when a Shutdown's context ends: kill the child
	done      chan struct{}       // closed when superviseLoop has returned and every child is reaped
	spawnDone chan struct{}       // closed when spawnLoop has returned
	flow      flowBudget          // the window growth of the responses of every child (see flowBudget)

	closeOnce sync.Once
	killOnce  sync.Once

	incarnation int // owned by superviseLoop (and by Start before it)

	mu              sync.Mutex    // guards the fields below
	cur             *child        // the child that takes new requests; nil while there is none
	changed         chan struct{} // closed, and replaced, whenever cur changes or closing begins
	inFlight        int           // requests in ServeHTTP
	drained         chan struct{} // closed when closing and inFlight reaches zero
	state           string
	retryAt         time.Time // while restarting: when the next start is due
	restarts        int
	lastIncarnation int   // the incarnation of the last child installed
	pids            []int // the last maxPidsKept children started, for tests
	lastRTT         time.Duration
	lastExit        string
	isClosed        bool
}

// logf logs a message about the module at warning level.
func (h *Handle) logf(format string, args ...any) {
	h.opts.Logger.Warn(fmt.Sprintf("subproc: module %q: ", h.name) + fmt.Sprintf(format, args...))
}

// Start spawns the child process of the module registered under name and
// returns once the module's ModuleFunc has returned in it, ready to serve. If
// the module is not registered, its ModuleFunc fails, or it does not become
// ready within opts.StartTimeout or before ctx ends, Start returns a
// *StartError and leaves nothing running. ctx bounds only the start, not the
// Handle's life.
func Start(ctx context.Context, name string, opts Options) (*Handle, error) {
	if lookup(name) == nil {
		return nil, &StartError{Module: name, Err: ErrNotRegistered}
	}
	if m := os.Getenv(envModule); m != "" {
		return nil, &StartError{Module: name, Err: fmt.Errorf("this process is a child running module %q but subproc.Main did not take over: make subproc.Main() the first statement of main (and of TestMain)", m)}
	}
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, &StartError{Module: name, Err: err}
	}
	capture, err := logcapture.New(logcapture.Options{
		Name:       name,
		Dir:        opts.LogDir,
		Stderr:     opts.Stderr,
		MaxSize:    opts.LogMaxSize,
		MaxBackups: opts.LogMaxBackups,
	})
	if err != nil {
		return nil, &StartError{Module: name, Err: err}
	}
	h := &Handle{
		name:      name,
		opts:      opts,
		capture:   capture,
		spawns:    make(chan spawnRequest),
		closing:   make(chan struct{}),
		kill:      make(chan struct{}),
		done:      make(chan struct{}),
		spawnDone: make(chan struct{}),
		changed:   make(chan struct{}),
		drained:   make(chan struct{}),
		state:     "starting",
	}
	h.life, h.endLife = context.WithCancel(context.Background())
	go h.spawnLoop()
	c, err := h.startChild(ctx)
	if err != nil {
		h.endLife()
		close(h.spawns)
		<-h.spawnDone
		capture.Close()
		return nil, err
	}
	h.install(c)
	go h.superviseLoop(c)
	return h, nil
}

// pidsStarted returns the pids of the last maxPidsKept children started.
func (h *Handle) pidsStarted() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.pids...)
}

// install makes c the child that takes new requests.
func (h *Handle) install(c *child) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cur = c
	h.lastIncarnation = c.incarnation
	h.state = "running"
	h.retryAt = time.Time{}
	h.notifyLocked()
}

// uninstall stops c from taking new requests.
func (h *Handle) uninstall(c *child, state string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cur == c {
		h.cur = nil
		h.state = state
		h.notifyLocked()
	}
}

func (h *Handle) notifyLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// acquire returns the child to send a request to, waiting for one while
// the module restarts, until deadline. The caller must call release.
//
// The timer is created at the first wait, so that a request that finds a
// child running costs none; the caller stops it.
func (h *Handle) acquire(ctx context.Context, deadline **time.Timer) (*child, error) {
	for {
		h.mu.Lock()
		if h.isClosed {
			h.mu.Unlock()
			return nil, ErrClosed
		}
		if c := h.cur; c != nil && c.usable() {
			h.inFlight++
			h.mu.Unlock()
			return c, nil
		}
		changed := h.changed
		h.mu.Unlock()
		if *deadline == nil {
			*deadline = time.NewTimer(h.opts.RestartWait)
		}
		select {
		case <-changed:
		case <-(*deadline).C:
			return nil, ErrUnavailable
		case <-ctx.Done():
			return nil, errCanceled
		}
	}
}

// release ends a request that acquire admitted.
func (h *Handle) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inFlight--
	if h.inFlight == 0 && h.isClosed {
		h.closeDrainedLocked()
	}
}

func (h *Handle) closeDrainedLocked() {
	select {
	case <-h.drained:
	default:
		close(h.drained)
	}
}

// ServeHTTP forwards the request to the module's child, whatever its method
// and path, and writes the child's response to w as it arrives. While the
// module restarts, the request waits for the new child up to
// Options.RestartWait, then gets 503 Service Unavailable with Retry-After. If
// the child dies before the response starts, the request gets 502 Bad
// Gateway; after, the client's connection is aborted (ServeHTTP panics with
// http.ErrAbortHandler, as httputil.ReverseProxy does). When the client goes
// away, the handler's context in the child is canceled.
func (h *Handle) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	head := newRequestHead(r)
	var deadline *time.Timer // see acquire
	defer func() {
		if deadline != nil {
			deadline.Stop()
		}
	}()
	for {
		c, err := h.acquire(r.Context(), &deadline)
		if err != nil {
			h.unavailable(w, err)
			return
		}
		s, err := c.open(r, head)
		if err != nil {
			// The child had died before the request could be sent:
			// nothing of it reached the module, so the next child may
			// take it.
			h.release()
			continue
		}
		// The same holds if the child dies before it takes the
		// request (see acceptWord): then proxy asks for a retry.
		retry := func() bool {
			defer h.release()
			return h.proxy(w, r, c, s)
		}()
		if !retry {
			return
		}
	}
}

// unavailable answers a request that no child could take.
func (h *Handle) unavailable(w http.ResponseWriter, err error) {
	switch err {
	case errCanceled:
		// The client went away while waiting; nobody reads the answer.
		http.Error(w, fmt.Sprintf("subproc: module %q: request canceled while the module restarted", h.name), http.StatusServiceUnavailable)
	case ErrClosed:
		w.Header().Set("Connection", "close")
		http.Error(w, fmt.Sprintf("subproc: module %q is shut down", h.name), http.StatusServiceUnavailable)
	default:
		h.mu.Lock()
		retry := time.Until(h.retryAt)
		h.mu.Unlock()
		secs := max(1, int((retry+time.Second-1)/time.Second))
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		http.Error(w, fmt.Sprintf("subproc: module %q is restarting; retry in %ds", h.name, secs), http.StatusServiceUnavailable)
	}
}

// giveUp drops what the child sends for s from now on and tells the child
// the request is gone, so that its handler's context is canceled.
func giveUp(c *child, s *stream) {
	s.abandon()
	c.send(outFrame{kind: kindCancel, id: s.id}, nil)
}

// proxy copies the request body to the child and the child's response to w.
// It returns true, having written nothing, if the child died without reading
// the request and before any of the request's body was consumed: then the
// request may go to the next child.
func (h *Handle) proxy(w http.ResponseWriter, r *http.Request, c *child, s *stream) (retry bool) {
	ctx := r.Context()
	var rc *http.ResponseController // made when first needed: most responses need none
	controller := func() *http.ResponseController {
		if rc == nil {
			rc = http.NewResponseController(w)
		}
		return rc
	}
	var body *bodySender // nil for a request without a body
	if hasBody(r) {
		body = startBody(c, s, r, controller())
		defer body.halt()
	}

	var declared map[string]bool // trailers announced in the response head
	started := false             // the final response head was written to w
	for {
		ev, err := s.next(ctx.Done())
		if err == errCanceled {
			giveUp(c, s)
			if !started {
				// Usually nobody reads this. But if the context ended
				// with the client still there, it must not see an empty
				// 200 that looks like the module's answer.
				http.Error(w, fmt.Sprintf("subproc: module %q: request canceled: %v", h.name, context.Cause(ctx)), http.StatusServiceUnavailable)
			}
			return false
		}
		if err != nil {
			s.abandon()
			var nd *notDeliveredError
			if errors.As(err, &nd) && !started {
				body.halt()
				if !s.bodyTouched.Load() {
					return true
				}
			}
			if !started {
				http.Error(w, fmt.Sprintf("subproc: module %q failed before it answered: %v; it is being restarted", h.name, err), http.StatusBadGateway)
				return false
			}
			panic(http.ErrAbortHandler)
		}
		switch ev.kind {
		case kindResponse:
			if ev.head.FullDuplex {
				// Else net/http, at the first write of an HTTP/1 response,
				// discards what is left of the request body, as it would
				// for the handler in-process.
				controller().EnableFullDuplex()
			}
			dst := w.Header()
			if ev.head.Status < 200 && ev.head.Status != http.StatusSwitchingProtocols {
				for k, v := range ev.head.Header {
					dst[k] = v
				}
				w.WriteHeader(ev.head.Status)
				for k := range ev.head.Header {
					delete(dst, k)
				}
				continue
			}
			announced := ev.head.Header["Trailer"] // hop-by-hop, but announces the trailers
			removeHopByHop(ev.head.Header)
			for k, v := range ev.head.Header {
				if len(dst[k]) == 0 {
					dst[k] = v // decoded for this response alone
				} else {
					dst[k] = append(dst[k], v...)
				}
			}
			if len(ev.head.Trailer) > 0 {
				declared = make(map[string]bool, len(ev.head.Trailer))
				for _, k := range ev.head.Trailer {
					declared[k] = true
				}
				dst["Trailer"] = announced
			}
			w.WriteHeader(ev.head.Status)
			started = true
		case kindData:
			_, err := w.Write((*ev.buf)[:ev.n])
			putChunk(ev.buf)
			if err != nil && !errors.Is(err, http.ErrBodyNotAllowed) {
				// The client is gone.
				giveUp(c, s)
				return false
			}
			// Credit goes back half a window at a time, with the
			// window's growth while the stream drains quickly (see
			// recvWindow.consume).
			if n := s.consume(ev.n); n > 0 {
				c.sendWindowUpdate(s.id, n, ctx.Done())
			}
			if ev.flags&flagFlush != 0 {
				controller().Flush()
			}
		case kindEnd:
			dst := w.Header()
			for k, v := range ev.trailer {
				if declared[k] {
					dst[k] = v
				} else {
					dst[http.TrailerPrefix+k] = v
				}
			}
			return false
		case kindAbort:
			panic(http.ErrAbortHandler)
		}
	}
}

// A bodySender copies a request's body to the child, within the window the
// child grants, until the body ends or it is halted.
type bodySender struct {
	c    *child
	s    *stream
	r    *http.Request
	rc   *http.ResponseController // r's
	stop chan struct{}            // closed by halt
	done chan struct{}            // closed when run returns
	once sync.Once

	// reading is set while run reads r.Body. run checks stop after setting
	// it, so that halt, having closed stop, finds it clear only if no read
	// is under way or will start.
	reading atomic.Bool
}

// startBody starts sending r's body on stream s. rc is r's
// ResponseController, used to interrupt a blocked read of the body.
func startBody(c *child, s *stream, r *http.Request, rc *http.ResponseController) *bodySender {
	b := &bodySender{c: c, s: s, r: r, rc: rc, stop: make(chan struct{}), done: make(chan struct{})}
	go b.run()
	return b
}

// halt stops the sender and returns once it has stopped. It may be called
// more than once, and on a nil *bodySender (no body), where it does
// nothing.
func (b *bodySender) halt() {
	if b == nil {
		return
	}
	b.once.Do(func() {
		close(b.stop)
		if !b.reading.Load() {
			<-b.done
			return
		}
		// run may be blocked reading the client's body, which nobody
		// needs any more: a read deadline in the past wakes it.
		b.rc.SetReadDeadline(time.Now())
		<-b.done
		// Then lift it: net/http reads what is left of the body after
		// the handler returns, and a failed read there would cancel the
		// context of the connection's next request.
		b.rc.SetReadDeadline(time.Time{})
	})
}

func (b *bodySender) run() {
	defer close(b.done)
	c, s, r := b.c, b.s, b.r
	var sent int64 // body bytes read so far
	for {
		if r.ContentLength > 0 && sent >= r.ContentLength && len(r.Trailer) == 0 {
			// The declared body is all sent, and net/http's ends there:
			// the end costs no credit, so it goes without waiting for the
			// child to return any (a body of one window would otherwise
			// wait a round trip for it).
			c.send(outFrame{kind: kindEnd, id: s.id}, b.stop)
			return
		}
		credit, err := s.win.take(frameCost(1), frameCost(chunkSize), b.stop)
		if err != nil {
			return
		}
		n := credit - frameOverhead
		b.reading.Store(true)
		select {
		case <-b.stop:
			b.reading.Store(false)
			s.win.add(credit)
			return
		default:
		}
		size := n
		if left := r.ContentLength - sent; r.ContentLength > 0 && left < int64(size) {
			size = max(1, int(left))
		}
		buf := getBuffer(size)
		if len(*buf) < n {
			s.win.add(n - len(*buf))
			credit -= n - len(*buf)
			n = len(*buf)
		}
		s.bodyTouched.Store(true)
		m, rerr := r.Body.Read((*buf)[:n])
		sent += int64(m)
		b.reading.Store(false)
		switch {
		case m == 0:
			s.win.add(credit) // no frame is sent
		case m < n:
			s.win.add(n - m)
		}
		var batch [2]outFrame
		fs := batch[:0]
		if m > 0 {
			fs = append(fs, outFrame{kind: kindData, id: s.id, data: (*buf)[:m], buf: buf})
		} else {
			putChunk(buf)
		}
		if rerr == io.EOF {
			// net/http's bodies report the end with the last bytes: both
			// go in one write.
			end := outFrame{kind: kindEnd, id: s.id}
			if len(r.Trailer) > 0 {
				end.msg = &bodyEnd{Trailer: r.Trailer}
			}
			fs = append(fs, end)
		}
		if len(fs) > 0 && c.sendFrames(fs, b.stop) != nil {
			return
		}
		switch {
		case rerr == io.EOF:
			return
		case rerr != nil:
			select {
			case <-b.stop:
				// The response is complete; the body is not needed.
			default:
				c.send(outFrame{kind: kindEnd, flags: flagBodyError, id: s.id}, b.stop)
			}
			return
		}
	}
}

// Route returns a handler that forwards requests for path with the given
// method to the module. A request for another path gets 404 Not Found; one
// with another method gets 405 Method Not Allowed with an Allow header. A
// path that ends in a slash matches every path below it, as in
// http.ServeMux. A GET route also serves HEAD.
func (h *Handle) Route(path, method string) http.Handler {
	allow := method
	if method == http.MethodGet {
		allow = "GET, HEAD"
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		if p != path && !(strings.HasSuffix(path, "/") && strings.HasPrefix(p, path)) {
			http.NotFound(w, r)
			return
		}
		if r.Method != method && !(method == http.MethodGet && r.Method == http.MethodHead) {
			w.Header().Set("Allow", allow)
			http.Error(w, fmt.Sprintf("method %s not allowed for %s; use %s", r.Method, path, allow), http.StatusMethodNotAllowed)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// HealthCheck pings the module's current child once and returns the round
// trip. It fails with ErrUnavailable while the module restarts, and with
// ErrClosed once the handle is shut down.
func (h *Handle) HealthCheck(ctx context.Context) (time.Duration, error) {
	h.mu.Lock()
	c, closed := h.cur, h.isClosed
	h.mu.Unlock()
	switch {
	case closed:
		return 0, fmt.Errorf("%w: module %q was shut down; start it again to check its health", ErrClosed, h.name)
	case c == nil:
		return 0, fmt.Errorf("%w: module %q is restarting; retry later", ErrUnavailable, h.name)
	}
	rtt, err := c.ping(ctx.Done())
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return 0, fmt.Errorf("subproc: module %q: health check: %w", h.name, err)
	}
	return rtt, nil
}

// Shutdown stops the module gracefully: new requests get 503 Service
// Unavailable, in-flight requests finish, then the child is told to exit.
// If ctx ends first, the child is killed. Shutdown returns when the child
// has been reaped and every goroutine of the handle has returned: nil after a
// graceful stop, or an error wrapping ctx's error after a kill. It may be
// called more than once, and concurrently.
func (h *Handle) Shutdown(ctx context.Context) error {
	h.closeOnce.Do(func() {
		h.mu.Lock()
		h.isClosed = true
		h.state = "stopping"
		if h.inFlight == 0 {
			h.closeDrainedLocked()
		}
		h.notifyLocked()
		h.mu.Unlock()
		h.endLife()
		close(h.closing)
	})
	select {
	case <-h.done:
		return nil
	case <-ctx.Done():
		h.killOnce.Do(func() { close(h.kill) })
		<-h.done
		return fmt.Errorf("subproc: module %q: shutdown cut short, child killed: %w", h.name, ctx.Err())
	}
}

// Close is Shutdown with Options.ShutdownTimeout as the grace period.
func (h *Handle) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), h.opts.ShutdownTimeout)
	defer cancel()
	return h.Shutdown(ctx)
}

// Stats describes a Handle at one moment.
type Stats struct {
	Module      string        // the module's name
	State       string        // "starting", "running", "restarting", "stopping" or "stopped"
	Pid         int           // the running child's process id; 0 when none runs
	Incarnation int           // the running (or last) child's incarnation: 0 for the first
	Restarts    int           // children started after the first
	InFlight    int           // requests being served
	LastHealth  time.Duration // round trip of the last successful health check
	LastExit    string        // how the last child that ended ended; "" if none has
}

// Stats returns the handle's current state.
func (h *Handle) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := Stats{
		Module:      h.name,
		State:       h.state,
		Incarnation: h.incarnationLocked(),
		Restarts:    h.restarts,
		InFlight:    h.inFlight,
		LastHealth:  h.lastRTT,
		LastExit:    h.lastExit,
	}
	if h.cur != nil {
		st.Pid = h.cur.proc.Pid()
	}
	return st
}

func (h *Handle) incarnationLocked() int {
	if h.cur != nil {
		return h.cur.incarnation
	}
	return h.lastIncarnation
}
