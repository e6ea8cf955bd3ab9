package subproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
	"github.com/fbbf71ac/subproc/internal/logcapture"
	"golang.org/x/sync/semaphore"
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

	// RestartWait bounds how long a request that finds no child to take it
	// (the module restarts) waits for one, and how long a request waits in
	// the admission queue (see MaxInFlight): both waits together, for a
	// request that has both. After it, the request gets 503
	// Service Unavailable with a Retry-After header. Zero means 10s; a
	// negative value means requests do not wait.
	RestartWait time.Duration

	// MaxRestartDelay caps the delay between restarts of a module that keeps
	// failing. A child that dies after serving for a second or more is
	// restarted at once, and so is the first of children that die younger;
	// each further child in a row that dies within a second of becoming
	// ready (or fails to start) doubles the delay, from 100ms up to
	// MaxRestartDelay, whether or not it answered requests first. A child
	// that serves for a second resets it. Zero means 10s.
	MaxRestartDelay time.Duration

	// ShutdownTimeout is the grace period Close gives in-flight requests
	// (see Shutdown), and the one a child replaced by Restart or recycling
	// gives its requests before they are canceled. Zero means 10s.
	ShutdownTimeout time.Duration

	// Env is the child's environment, as exec.Cmd.Env: nil means the
	// parent's. The child is the running binary, started again with its
	// path as its only argument; besides the environment and Dir it
	// inherits nothing of the parent but what Main sets up.
	Env []string

	// Dir is the child's working directory; "" means the parent's.
	Dir string

	// Children is how many child processes serve the module at once, each
	// supervised, health-checked, recycled and restarted on its own. A
	// request goes to the least loaded child that passes its health checks.
	// Zero means 1.
	Children int

	// MaxRequests is how many requests a child answers before it is
	// replaced gracefully (see Restart); zero means no limit. Each child's
	// limit is lowered at random by up to 10%, so that the children of a
	// pool are not all replaced at once. A child due for replacement (by
	// MaxRequests, MaxLifetime, MemoryHigh or a stuck handler) serves on
	// until the child that its slot's last replacement replaced has
	// drained, which takes up to ShutdownTimeout: a slot runs at most two
	// children.
	MaxRequests int

	// MaxLifetime is how long a child serves before it is replaced
	// gracefully (see Restart); zero means no limit. Each child's is
	// lowered at random by up to 10%.
	MaxLifetime time.Duration

	// MaxInFlight caps the requests served at once, all children together;
	// zero means no cap. Requests beyond it wait, in the order they came,
	// in a queue of MaxQueued for at most RestartWait; those that find the
	// queue full, or wait in vain, get 503 Service Unavailable with
	// Retry-After at once. Health checks never wait behind requests. A
	// request whose client left, or whose deadline passed, is served until
	// its handler returns: it keeps its place until then, or until its
	// child ends (a handler that never returns makes the child stuck: see
	// StuckTimeout).
	MaxInFlight int

	// MaxQueued is how many requests may wait beyond MaxInFlight; zero
	// means none wait.
	MaxQueued int

	// RequestTimeout bounds a request's life, from its arrival: its
	// context, in the parent and in the child's handler, ends at most this
	// long after it arrived, or at its own deadline if that comes first.
	// At the deadline the client gets 504 Gateway Timeout if nothing was
	// sent yet, an aborted response otherwise. A connection the handler
	// hijacked (a WebSocket) outlives it: its handler's context ends at
	// the deadline, as any request's, but the connection carries bytes
	// until a side closes it. Zero means no bound but the request's own
	// deadline, which reaches the child all the same.
	RequestTimeout time.Duration

	// StuckTimeout is how long a handler may run on after its request's
	// context ended (the client left, or the deadline passed), and the
	// parent gave the request up (at once, or, for a client that may still
	// read, once the module no longer answers: see the README's
	// Cancellation), before its child counts as stuck: the child's
	// goroutine stacks are written to
	// the module's log, a ChildStuck event is posted, and the child is
	// replaced gracefully. Zero means 10s; a negative value, never.
	StuckTimeout time.Duration

	// MemoryHigh is a child's resident memory, in bytes, past which it is
	// replaced gracefully (see Restart); MemoryMax, past which it is
	// killed at once and restarted like a crashed one. Memory is checked
	// every HealthInterval. Resident memory includes the pages of the
	// program's binary that the child has touched; on Linux, those that
	// package initialization touched leave it 50 ms after the module is
	// initialized, so that the limits bound mostly what the module uses.
	// Zero means no limit. Unless Env sets GOMEMLIMIT, a child with a
	// limit gets a GOMEMLIMIT of 90% of the lower one, so that the Go
	// runtime collects before it is reached.
	MemoryHigh int64
	MemoryMax  int64

	// OnEvent, if not nil, is called for every event of the module's life
	// (see Event): starts, failed health checks, recycling, exits, backoff
	// and degraded states, in the order they happened, from one goroutine
	// of the Handle's. It never delays the module: events wait in a queue
	// while it runs, and if it is so slow that 4096 of them wait, further
	// events are dropped and the parent logs how many; once those waiting
	// hold 4 MiB of Output, further events come with one line of Output
	// that says how much was dropped. A panic in it is
	// logged, and the next event delivered. Its last call happens before
	// Shutdown returns, unless Shutdown's context ended first: so a
	// Shutdown (or Close) called from OnEvent waits for OnEvent to return,
	// that is for itself, until its context ends. To shut the module down
	// on an event, call it from a goroutine of its own (go h.Close()).
	OnEvent func(Event)
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
	if o.Children == 0 {
		o.Children = 1
	}
	def(&o.StuckTimeout, 10*time.Second)
	if o.LogMaxSize == 0 {
		o.LogMaxSize = 100
	}
	switch {
	case o.LogMaxBackups == 0:
		o.LogMaxBackups = 5
	case o.LogMaxBackups < 0:
		o.LogMaxBackups = 0 // logcapture keeps all
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
	for _, n := range []struct {
		name string
		v    int
	}{{"Children", o.Children}, {"MaxRequests", o.MaxRequests}, {"MaxInFlight", o.MaxInFlight}, {"MaxQueued", o.MaxQueued}} {
		if n.v < 0 {
			return fmt.Errorf("Options.%s is negative (%d)", n.name, n.v)
		}
	}
	if o.MaxLifetime < 0 {
		return fmt.Errorf("Options.MaxLifetime is negative (%v)", o.MaxLifetime)
	}
	if o.RequestTimeout < 0 {
		return fmt.Errorf("Options.RequestTimeout is negative (%v)", o.RequestTimeout)
	}
	if o.MemoryHigh < 0 || o.MemoryMax < 0 {
		return fmt.Errorf("Options.MemoryHigh (%d) or MemoryMax (%d) is negative", o.MemoryHigh, o.MemoryMax)
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

	pid, incarnation int // the child that failed, if one was started: for its ChildExited
}

// Error says what failed, names the module, says what to do, and ends
// with the child's last lines of output, if it wrote any.
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

// Unwrap returns Err, so that errors.Is finds ErrNotRegistered,
// ErrStartTimeout or a context's error behind a StartError.
func (e *StartError) Unwrap() error { return e.Err }

// A Handle runs one module in child processes (Options.Children of them)
// and forwards HTTP requests to them. It restarts a child when it exits or
// stops answering health checks, and replaces it gracefully when Restart
// or recycling asks. A Handle is safe for concurrent use. After Start has
// returned a Handle, Shutdown or Close must be called to stop the children
// and release the goroutines that watch them.
type Handle struct {
	name      string              // fixed
	opts      Options             // fixed, with defaults applied
	capture   *logcapture.Capture // fixed
	events    *eventQueue         // fixed; delivers to Options.OnEvent
	slots     []*supervisor       // fixed; one per child of the pool
	launch    launcher            // fixed; starts a child process (see spawn)
	spawns    chan spawnRequest   // to spawnLoop; closed by finish
	spawnDone chan struct{}       // closed when spawnLoop has returned
	life      context.Context     // fixed; canceled when Shutdown begins
	endLife   context.CancelFunc  // fixed; called with mu held
	kill      chan struct{}       // closed when a Shutdown's context ends: end the drains
	flow      flowBudget          // the window growth of the responses of every child (see flowBudget)
	heads     flowBudget          // the large heads and trailers of the responses of every child (see headBudgetSize)
	killOnce  sync.Once
	drains    sync.WaitGroup             // drains of replaced children
	reaped    chan struct{}              // closed when every supervisor and drain has returned and every child is reaped
	done      chan struct{}              // closed after reaped, once OnEvent has had every event
	admission *semaphore.Weighted        // fixed; nil without Options.MaxInFlight
	queued    atomic.Int64               // requests waiting for admission
	local     atomic.Pointer[addrString] // the last local address sent (see localAddr)

	mu              sync.Mutex    // guards the fields below, and the fields of children and supervisors that say so
	changed         chan struct{} // closed, and replaced, whenever a slot's child changes or Shutdown begins
	turn            int           // where pickLocked starts
	inFlight        int           // requests in ServeHTTP that acquired a child
	incarnation     int           // the next child's
	kids            []*child      // the children started and not yet reaped, oldest first
	newest          *child        // the child installed last
	restarts        int
	lastIncarnation int   // the incarnation of the last child installed
	pids            []int // the last maxPidsKept children started, for tests
	lastExit        string
	stats           Stats // the counters
	stopped         bool  // every child is reaped
}

// A launcher starts a child process for slot and incarnation, with its
// pipes. Handle.spawn is the one real children use; tests put fakes in its
// place.
type launcher func(slot, incarnation int) (process, *childPipes, error)

// logf logs a message about the module at warning level.
func (h *Handle) logf(format string, args ...any) {
	h.opts.Logger.Warn(fmt.Sprintf("subproc: module %q: ", h.name) + fmt.Sprintf(format, args...))
}

// post reports ev to Options.OnEvent.
func (h *Handle) post(ev Event) {
	ev.Module = h.name
	h.events.post(ev)
}

// Start spawns the child processes of the module registered under name
// (Options.Children of them, one after the other) and returns once the
// module's ModuleFunc has returned in each, ready to serve. If the module is
// not registered, its ModuleFunc fails, or it does not become ready within
// opts.StartTimeout or before ctx ends, Start returns a *StartError and
// leaves nothing running. ctx bounds only the start, not the Handle's life.
func Start(ctx context.Context, name string, opts Options) (*Handle, error) {
	return start(ctx, name, opts, nil)
}

// start is Start with a launcher; nil means spawn.
func start(ctx context.Context, name string, opts Options, launch launcher) (*Handle, error) {
	if lookup(name) == nil && launch == nil {
		return nil, &StartError{Module: name, Err: ErrNotRegistered}
	}
	if m := os.Getenv(envModule); m != "" {
		return nil, &StartError{Module: name, Err: fmt.Errorf("this process is a child running module %q but subproc.Main did not take over: make subproc.Main() the first statement of main (and of TestMain)", m)}
	}
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, &StartError{Module: name, Err: err}
	}
	if n, limit := len(opts.Config), maxHeadSize-len(name)-len(opts.LogDir); n > limit {
		return nil, &StartError{Module: name, Err: fmt.Errorf("Options.Config is %d bytes, over the limit of %d bytes that the child's first message can carry; pass a smaller Config, or the path of a file that holds it", n, limit)}
	}
	capture, err := logcapture.New(logcapture.Options{
		Name:       name,
		Dir:        opts.LogDir,
		Stderr:     opts.Stderr,
		MaxSize:    opts.LogMaxSize,
		MaxBackups: opts.LogMaxBackups,
		OnWriteError: func(s logcapture.Stream, err error, lost int) {
			if err != nil {
				opts.Logger.Warn(fmt.Sprintf("subproc: module %q: cannot write its %v output (%v); lines lost since the last report: %d. Free space or fix the log destination: writing resumes by itself; this is reported at most every 10s", name, s, err, lost))
			} else {
				opts.Logger.Warn(fmt.Sprintf("subproc: module %q: writing its %v output again; lines lost while it failed: %d", name, s, lost))
			}
		},
	})
	if err != nil {
		return nil, &StartError{Module: name, Err: err}
	}
	h := &Handle{
		name:      name,
		opts:      opts,
		capture:   capture,
		spawns:    make(chan spawnRequest),
		spawnDone: make(chan struct{}),
		kill:      make(chan struct{}),
		reaped:    make(chan struct{}),
		done:      make(chan struct{}),
		changed:   make(chan struct{}),
		heads:     flowBudget{limit: headBudgetSize},
	}
	h.events = newEventQueue(opts.OnEvent, h.logf)
	if opts.MaxInFlight > 0 {
		h.admission = semaphore.NewWeighted(int64(opts.MaxInFlight))
	}
	h.launch = launch
	if h.launch == nil {
		h.launch = h.spawn
	}
	h.life, h.endLife = context.WithCancel(context.Background())
	go h.spawnLoop()
	first := make([]*child, opts.Children)
	for i := range first {
		h.slots = append(h.slots, &supervisor{h: h, slot: i, asks: make(chan replaceAsk)})
		c, err := h.startChild(ctx, i, "")
		if err != nil {
			h.mu.Lock()
			h.endLife()
			h.mu.Unlock()
			for _, c := range first[:i] {
				h.teardown(c)
				// Its ChildStarted was posted: so is its end.
				h.postExited(c, "shutdown", c.tail())
			}
			h.finish()
			return nil, err
		}
		first[i] = c
	}
	var sups sync.WaitGroup
	for i, s := range h.slots {
		s.install(first[i])
		sups.Go(func() { s.run(first[i]) })
	}
	go func() {
		sups.Wait()
		h.drains.Wait()
		h.finish()
	}()
	return h, nil
}

// finish releases what the handle holds once its last child is reaped.
func (h *Handle) finish() {
	close(h.spawns)
	<-h.spawnDone
	h.capture.Close()
	h.mu.Lock()
	h.stopped = true
	h.mu.Unlock()
	close(h.reaped)
	h.events.close()
	close(h.done)
}

// pidsStarted returns the pids of the last maxPidsKept children started.
func (h *Handle) pidsStarted() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.pids...)
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
	// The module's header map starts as w's. It is encoded when the head
	// is sent, before proxy changes it.
	head.ResponseHeader = w.Header()
	if head.Hijackable = r.ProtoMajor == 1 && canHijack(w); head.Hijackable {
		head.LocalAddr = h.localAddr(r)
	}
	if n := head.wireSize(); n > maxHeadSize {
		// Checked before it is sent: a message too large for a frame would
		// break the pipe, and every request on it.
		http.Error(w, fmt.Sprintf("subproc: module %q: the request's head (about %d bytes) exceeds the %d bytes a message to the module can carry; send fewer or smaller header fields", h.name, n, maxHeadSize), http.StatusRequestHeaderFieldsTooLarge)
		return
	}
	if t := h.opts.RequestTimeout; t > 0 {
		d := time.Now().Add(t)
		if cur, ok := r.Context().Deadline(); !ok || d.Before(cur) {
			ctx, cancel := context.WithDeadlineCause(r.Context(), d, errRequestTimeout)
			defer cancel()
			r = r.WithContext(ctx)
		}
	}
	if d, ok := r.Context().Deadline(); ok {
		head.Deadline = d.UnixNano() // the handler's context in the child ends with ours
	}
	queuedAt, err := h.admit(r.Context())
	if err != nil {
		h.unavailable(w, r, err)
		return
	}
	admitted := true // the place is ours to give back, unless an exchange gave it back (see exchange.freePlace)
	defer func() {
		if admitted {
			h.unadmit()
		}
	}()
	var deadline *time.Timer // see acquire
	if !queuedAt.IsZero() {
		// RestartWait bounds the whole wait: the queue's and then the
		// child's.
		deadline = time.NewTimer(max(0, h.opts.RestartWait-time.Since(queuedAt)))
	}
	defer func() {
		if deadline != nil {
			deadline.Stop()
		}
	}()
	for {
		c, err := h.acquire(r.Context(), &deadline)
		if err != nil {
			h.unavailable(w, r, err)
			return
		}
		s, err := c.open(r, head)
		if err == errCanceled {
			// The client went away while the child's pipe was backed up.
			h.release(c, false)
			h.unavailable(w, r, err)
			return
		}
		if err != nil {
			// The child had died before the request could be sent:
			// nothing of it reached the module, so the next child may
			// take it.
			h.release(c, false)
			continue
		}
		// The same holds if the child dies before it takes the
		// request (see acceptWord): then proxy asks for a retry.
		retry := func() bool {
			defer func() {
				h.release(c, s.answered())
				if s.x.placeFreed { // also when proxy panics: an aborted response
					admitted = false
				}
			}()
			return h.proxy(w, r, c, s, admitted)
		}()
		if !retry {
			return
		}
	}
}

// errRequestTimeout is the cause of a request context that
// Options.RequestTimeout ended.
var errRequestTimeout = errors.New("subproc: the request outlived Options.RequestTimeout")

// errShed reports a request that admission turned away (see
// Options.MaxInFlight).
var errShed = errors.New("subproc: too many requests")

// admit reserves, for a request, one of the Options.MaxInFlight places,
// waiting for one in the queue if it has room. It fails with errShed if
// there is none in time, errCanceled if ctx ends first, or ErrClosed if
// Shutdown begins first. A request that
// was admitted must call unadmit. If it had to wait, queuedAt is when it
// began to: RestartWait bounds its wait for a child too (see acquire).
func (h *Handle) admit(ctx context.Context) (queuedAt time.Time, err error) {
	if h.admission == nil || h.admission.TryAcquire(1) {
		return time.Time{}, nil
	}
	if h.queued.Add(1) > int64(h.opts.MaxQueued) {
		h.queued.Add(-1)
		return time.Time{}, errShed
	}
	defer h.queued.Add(-1)
	queuedAt = time.Now()
	wait, cancel := context.WithTimeout(ctx, h.opts.RestartWait)
	defer cancel()
	defer context.AfterFunc(h.life, cancel)() // Shutdown: no place will be served
	if err := h.admission.Acquire(wait, 1); err != nil {
		switch {
		case ctx.Err() != nil:
			return time.Time{}, errCanceled
		case h.life.Err() != nil:
			return time.Time{}, ErrClosed
		}
		return time.Time{}, errShed
	}
	return queuedAt, nil
}

// unadmit gives back the place admit reserved.
func (h *Handle) unadmit() {
	if h.admission != nil {
		h.admission.Release(1)
	}
}

// unavailable answers a request r that no child could take.
func (h *Handle) unavailable(w http.ResponseWriter, r *http.Request, err error) {
	if err == errCanceled && r.Context().Err() == context.DeadlineExceeded {
		h.count(&h.stats.Timeouts)
		http.Error(w, fmt.Sprintf("subproc: module %q: the request's deadline passed before a child could take it (%v)", h.name, context.Cause(r.Context())), http.StatusGatewayTimeout)
		return
	}
	if err != errCanceled {
		// Else the client went away (see exchange.canceled, which does
		// not count it either).
		h.count(&h.stats.Unavailable)
	}
	switch err {
	case errShed:
		w.Header().Set("Retry-After", "1")
		http.Error(w, fmt.Sprintf("subproc: module %q is serving its limit of %d requests (Options.MaxInFlight) and has %d waiting (Options.MaxQueued); retry later", h.name, h.opts.MaxInFlight, h.opts.MaxQueued), http.StatusServiceUnavailable)
	case errCanceled:
		// The client went away while waiting; nobody reads the answer.
		http.Error(w, fmt.Sprintf("subproc: module %q: request canceled while the module restarted", h.name), http.StatusServiceUnavailable)
	case ErrClosed:
		w.Header().Set("Connection", "close")
		http.Error(w, fmt.Sprintf("subproc: module %q is shut down", h.name), http.StatusServiceUnavailable)
	default:
		h.mu.Lock()
		retry := time.Duration(-1) // until the soonest restart
		for _, s := range h.slots {
			if d := time.Until(s.retryAt); s.cur == nil && (retry < 0 || d < retry) {
				retry = d
			}
		}
		h.mu.Unlock()
		secs := max(1, int((retry+time.Second-1)/time.Second))
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		http.Error(w, fmt.Sprintf("subproc: module %q is restarting; retry in %ds", h.name, secs), http.StatusServiceUnavailable)
	}
}

// count adds one to a counter of h.stats.
func (h *Handle) count(n *uint64) {
	h.mu.Lock()
	*n++
	h.mu.Unlock()
}

// Route returns a handler that forwards requests for path with the given
// method to the module, matching them as an http.ServeMux with the one
// pattern "method path" does: path may hold wildcards ("{id}", a last
// "{rest...}"), end in "{$}" for an exact match, or end in a slash to match
// every path below it; a GET route also serves HEAD. A request for another
// path gets 404 Not Found; one with another method gets 405 Method Not
// Allowed with an Allow header. An empty method matches every method, as a
// pattern without one does. The request reaches the module with the
// pattern and its path values set (r.Pattern, r.PathValue), as ServeMux
// sets them.
//
// Route panics if path or method is invalid, as ServeMux.Handle panics on a
// bad pattern: if path does not begin with a slash, if ServeMux rejects the
// pattern, or if method is not an HTTP token or is a standard method not in
// upper case ("get", which would match no request).
func (h *Handle) Route(path, method string) http.Handler {
	return routeHandler(h.name, path, method, h)
}

// HealthCheck pings each running child of the module once, and returns
// the longest round trip. It waits at most Options.HealthTimeout for the
// answers. It fails if a child fails to answer, with ErrUnavailable while no
// child runs (the module restarts), and with ErrClosed once the handle is
// shut down. Its outcome for each child counts as one of the periodic
// health checks (see Options.HealthFailures), unless ctx ended first.
func (h *Handle) HealthCheck(ctx context.Context) (time.Duration, error) {
	var kids []*child
	h.mu.Lock()
	for _, s := range h.slots {
		if s.cur != nil {
			kids = append(kids, s.cur)
		}
	}
	h.mu.Unlock()
	switch {
	case h.life.Err() != nil:
		return 0, fmt.Errorf("%w: module %q was shut down; start it again to check its health", ErrClosed, h.name)
	case len(kids) == 0:
		return 0, fmt.Errorf("%w: module %q is restarting; retry later", ErrUnavailable, h.name)
	}
	rtts := make([]time.Duration, len(kids))
	errs := make([]error, len(kids))
	var wg sync.WaitGroup
	for i, c := range kids {
		wg.Go(func() { rtts[i], errs[i] = h.checkOnce(ctx, c) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return slices.Max(rtts), nil
}

// checkOnce is HealthCheck for one child.
func (h *Handle) checkOnce(ctx context.Context, c *child) (time.Duration, error) {
	// Bounded by HealthTimeout as the supervisor's checks are, so that it
	// fails in the same cases.
	timeout := make(chan struct{})
	stop := context.AfterFunc(ctx, func() { close(timeout) })
	t := time.AfterFunc(h.opts.HealthTimeout, func() {
		if stop() {
			close(timeout)
		}
	})
	rtt, err := c.ping(timeout)
	t.Stop()
	stop()
	switch {
	case err == nil:
		h.passedCheck(c, rtt)
		return rtt, nil
	case ctx.Err() != nil:
		// The caller gave up; that says nothing of the child.
		return 0, fmt.Errorf("subproc: module %q: health check: %w", h.name, ctx.Err())
	}
	// It counts as one of the supervisor's checks: the one that makes
	// Options.HealthFailures in a row kills the child.
	if !h.failedCheck(c, err) {
		// Its monitor kills it, as after its own checks: its stacks
		// first (see killHung), without holding the caller for them.
		// (A monitor that has returned did so because c is ending.)
		select {
		case c.hung <- struct{}{}:
		default:
		}
	}
	return 0, fmt.Errorf("subproc: module %q: health check of child pid %d: %w", h.name, c.proc.Pid(), err)
}

// Restart replaces every child of the module, one at a time, without
// failing a request: for each child, a new one starts, and once it is
// ready new requests go to it, while the old child drains (see Shutdown,
// with Options.ShutdownTimeout as the grace period) and stops. A pool of
// one thus briefly runs two children. Restart returns once every old child
// has stopped, or when ctx ends, leaving the drain under way to finish. If a
// new child cannot start (its ModuleFunc fails, or it is not ready within
// Options.StartTimeout or before ctx ends), the old one keeps serving and
// Restart returns the *StartError, without replacing the children after
// it. A slot whose child is restarting after a crash is skipped: its next
// child is new anyway.
func (h *Handle) Restart(ctx context.Context) error {
	for _, s := range h.slots {
		ready, done := make(chan error, 1), make(chan error, 1)
		if err := ctx.Err(); err != nil {
			// No new child can start: the same *StartError whether or
			// not the slot's supervisor was free to take the ask.
			return &StartError{Module: h.name, Err: err}
		}
		select {
		case s.asks <- replaceAsk{reason: "restart", ctx: ctx, done: done, ready: ready}:
		case <-h.life.Done():
			return fmt.Errorf("%w: module %q was shut down; Restart has nothing to replace", ErrClosed, h.name)
		case <-ctx.Done():
			// The slot was busy (replacing or restarting its child)
			// until ctx ended: its new child could not start in time.
			return &StartError{Module: h.name, Err: ctx.Err()}
		}
		// The start ends soon after ctx does, with the *StartError.
		if err := <-ready; err != nil {
			return err
		}
		select {
		case err := <-done:
			if err != nil {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("subproc: module %q: restart: %w", h.name, ctx.Err())
		}
	}
	return nil
}

// Ready reports whether the module can take a request now: a child is
// running and the handle is not shutting down. Made for readiness probes.
func (h *Handle) Ready() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.life.Err() == nil && h.pickLocked() != nil
}

// Shutdown stops the module gracefully. It drains the children: new
// requests get 503 Service Unavailable, the context each child's ModuleFunc
// was given is canceled at once, so that long-lived handlers (streams,
// WebSockets) can end, and in-flight requests run on until they end. Then
// each child is told to exit. If ctx ends first, the contexts of the
// requests still in flight are canceled in the children, which get a moment
// (half a second) to exit before they are killed, and the parent's writes
// of their responses fail, so that none waits on for a client that reads
// nothing. Health checks go on during the drain: a child that hangs is
// killed as at any other time, and its drain ends. A request in flight
// may never end (a stream, or a client that reads nothing): give ctx a
// deadline, as Close does.
//
// Shutdown returns when every child has been reaped and every goroutine of
// the handle has returned, OnEvent's for every event posted: nil after a
// graceful stop, or an error wrapping ctx's error after ctx ended, then
// without waiting for OnEvent. Called from OnEvent, it returns once every
// child has been reaped, and the events posted meanwhile are delivered
// after the callback returns. It may be called more than once, and
// concurrently.
func (h *Handle) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	h.endLife()
	h.notifyLocked()
	h.mu.Unlock()
	done := h.done
	if h.events.inCallback() {
		done = h.reaped // h.done waits for the callback to return
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		h.killOnce.Do(func() { close(h.kill) })
		<-h.reaped // OnEvent, which may block, is not waited for
		return fmt.Errorf("subproc: module %q: shutdown cut short, requests canceled: %w", h.name, ctx.Err())
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
	Module string // the module's name
	// State is "starting" (before Start returns), "running", "unhealthy"
	// (every running child failed its last health check; a child is killed
	// after Options.HealthFailures in a row), "restarting" (no child runs),
	// "stopping" (draining at Shutdown) or "stopped".
	State       string
	Pid         int           // the newest running child's process id; 0 when none runs
	Incarnation int           // the newest running (or last) child's incarnation
	Restarts    int           // children started after a child died or failed to start
	InFlight    int           // requests being served
	LastHealth  time.Duration // round trip of the newest running child's last successful health check
	LastExit    string        // how the last child that died ended; "" if none has

	Children []ChildStats // one per child started and not yet reaped, oldest first

	// Counters since Start. Requests counts the requests whose handler
	// ended in a child while the parent still waited for it, with the
	// response whole or aborted: a request in Aborted or Timeouts is in
	// Requests too if its handler ended in time.
	Requests    uint64 // requests whose handler a child ran to its end
	BadGateway  uint64 // 502s: the child died before answering
	Unavailable uint64 // 503s: no child in time, shed, or shut down
	Timeouts    uint64 // 504s and aborts by RequestTimeout
	Aborted     uint64 // responses cut off after they had started
}

// ChildStats describes one child process of a module.
type ChildStats struct {
	Pid, Incarnation, Slot int
	// State is "starting", "running", "unhealthy" (it failed its last
	// health check) or "draining" (it is being replaced or shut down, and
	// takes no new requests).
	State        string
	Started      time.Time     // when it became ready
	InFlight     int           // requests it is serving
	Requests     uint64        // requests it has answered, as Stats.Requests counts them (this is what MaxRequests counts)
	Memory       int64         // resident bytes at the last check; 0 if unknown
	LastHealth   time.Duration // round trip of its last successful health check
	FailedChecks int           // health checks failed in a row (Handle.HealthCheck's too)
}

// Stats returns the handle's current state.
func (h *Handle) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.stats
	st.Module = h.name
	st.Incarnation = h.lastIncarnation
	st.Restarts = h.restarts
	st.InFlight = h.inFlight
	st.LastExit = h.lastExit
	for i := len(h.kids) - 1; i >= 0; i-- {
		if c := h.kids[i]; c.state == "running" {
			st.Pid, st.Incarnation, st.LastHealth = c.proc.Pid(), c.incarnation, c.lastRTT
			break
		}
	}
	running, healthy := 0, 0
	for _, c := range h.kids {
		cs := ChildStats{
			Pid:          c.proc.Pid(),
			Incarnation:  c.incarnation,
			Slot:         c.slot,
			State:        c.state,
			Started:      c.readyAt,
			InFlight:     c.inFlight,
			Requests:     c.requests,
			Memory:       c.memory,
			LastHealth:   c.lastRTT,
			FailedChecks: c.failedChecks,
		}
		if cs.State == "running" {
			running++
			if c.failedChecks > 0 {
				cs.State = "unhealthy"
			} else {
				healthy++
			}
		}
		st.Children = append(st.Children, cs)
	}
	switch {
	case h.stopped:
		st.State = "stopped"
	case h.life.Err() != nil:
		st.State = "stopping"
	case h.slots == nil || h.newest == nil:
		st.State = "starting"
	case healthy > 0:
		st.State = "running"
	case running > 0:
		st.State = "unhealthy"
	default:
		st.State = "restarting"
	}
	return st
}

// An addrString is a local address and its String.
type addrString struct {
	addr net.Addr
	s    string
}

// localAddr returns the address of the connection r came on, in the parent
// (http.LocalAddrContextKey), as its network, a space and its String: the
// child's http.LocalAddrContextKey, and a hijacked conn's LocalAddr. The
// last one is kept, since almost every request comes through the same
// listener: it costs no allocation then.
func (h *Handle) localAddr(r *http.Request) string {
	a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		return ""
	}
	if c := h.local.Load(); c != nil && sameAddr(c.addr, a) {
		return c.s
	}
	c := &addrString{a, a.Network() + " " + a.String()}
	h.local.Store(c)
	return c.s
}

// sameAddr reports whether x and y are the same address.
func sameAddr(x, y net.Addr) bool {
	if x == y {
		return true
	}
	tx, ok := x.(*net.TCPAddr)
	ty, ok2 := y.(*net.TCPAddr)
	return ok && ok2 && tx.Port == ty.Port && tx.Zone == ty.Zone && tx.IP.Equal(ty.IP)
}
