package subproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/fbbf71ac/subproc/internal/frame"
)

// Env is what a module is given in its child process.
type Env struct {
	Name string // the name the module was registered under
	// Incarnation numbers the children of a Handle in the order they were
	// started, from 0: each child, whatever its slot, has its own, and a
	// restarted or replaced child a new one.
	Incarnation int
	Slot        int          // which of Options.Children this child fills: 0 … Children-1
	Config      []byte       // Options.Config, exactly as given to Start
	LogDir      string       // Options.LogDir
	Logger      *slog.Logger // the module's own log: <LogDir>/<Name>.log, with time, level, source and message
}

// A ModuleFunc runs in the child. It initialises the module and returns the
// handler that serves every request the parent forwards. The child reports
// ready only after it returns; an error fails the start. ctx is cancelled
// when a drain of the child begins (Handle.Shutdown): long-lived handlers,
// such as event streams, should watch it and end, while other requests in
// flight run on until they end or the drain's grace period does, when their
// own contexts are canceled.
type ModuleFunc func(ctx context.Context, env *Env) (http.Handler, error)

// registry holds the registered modules.
var registry struct {
	mu sync.Mutex // guards m
	m  map[string]ModuleFunc
}

// Register declares a module. Call it from init() or from main() before Main,
// in the binary that starts the module: the child is a re-exec of that same
// binary and finds the module by name. It panics on an empty or duplicate name,
// or a nil fn.
func Register(name string, fn ModuleFunc) {
	if name == "" {
		panic("subproc: Register with an empty module name")
	}
	if fn == nil {
		panic(fmt.Sprintf("subproc: Register(%q) with a nil ModuleFunc", name))
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if _, dup := registry.m[name]; dup {
		panic(fmt.Sprintf("subproc: Register called twice for module %q", name))
	}
	if registry.m == nil {
		registry.m = make(map[string]ModuleFunc)
	}
	registry.m[name] = fn
}

// lookup returns the ModuleFunc registered under name, or nil.
func lookup(name string) ModuleFunc {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return registry.m[name]
}

// Main must be the first statement of main() (and of TestMain). In a process
// started by Start it runs the module and exits, never returning; in any
// other process it returns at once.
//
// In a child, Main takes the protocol pipes (stdin and stdout) for itself
// before any module code runs, then points file descriptors 1 and 2 at the
// module's log capture and 0 at /dev/null, so that whatever the module prints,
// through os.Stdout, fmt.Println or a raw write to fd 1, can never corrupt the
// protocol. A binary run by hand with SUBPROC_MODULE set prints an error that
// says so and exits with status 2.
//
// The first Start of a process also starts its watcher, one process
// shared by every Handle, which kills the processes modules started if the
// parent dies (see the package documentation); Main, in the watcher, waits
// for the parent's death and never returns either. A binary run by hand
// with SUBPROC_WATCHER set prints an error and exits with status 2.
func Main() {
	if ppid, ok := os.LookupEnv(envWatcher); ok {
		os.Unsetenv(envWatcher)
		os.Exit(runWatcher(ppid))
	}
	name, ok := os.LookupEnv(envModule)
	if !ok {
		return
	}
	os.Unsetenv(envModule)
	os.Exit(runChild(name))
}

// Exit statuses of a child.
const (
	exitOK       = 0
	exitFailed   = 1 // the module failed to initialise, or the parent broke the protocol
	exitMisused  = 2 // not started by Start
	exitOrphaned = 3 // the parent went away without saying stop (see runChild)
)

// runChild runs module name for the parent and returns the exit status.
func runChild(name string) int {
	fds, err := takeOverFDs()
	if err != nil {
		fmt.Fprintf(os.Stderr, "subproc: this process was started with %s=%s set, but not by subproc.Start (%v), so it has no parent to serve.\n"+
			"Unset %s to run the program normally.\n", envModule, name, err, envModule)
		return exitMisused
	}
	// The module gets none of the parent's files but those Start gives.
	closeStrayFDs()
	if w := fds.accept.exitWord(); w != nil {
		armExitWord(w)
	}
	c := newConn(fds.in, fds.out)
	c.sendRing = fds.rings.up
	if err := frame.ReadPreamble(c.fr.Buffered(), protocolVersion); err != nil {
		var ve *frame.VersionError
		if errors.As(err, &ve) {
			fmt.Fprintf(os.Stderr, "subproc: module %q: the parent speaks protocol version %d and this binary %d: the parent must start its own binary\n", name, ve.Got, ve.Want)
		} else {
			fmt.Fprintf(os.Stderr, "subproc: module %q: no subproc handshake on stdin (%v); this program was not started by subproc.Start: unset %s to run it normally\n", name, err, envModule)
		}
		return exitMisused
	}
	var hi hello
	hdr, err := c.fr.ReadHeader()
	if err == nil && (hdr.Kind != kindHello || hdr.ID != 0) {
		err = fmt.Errorf("first message is of kind %d, want hello", hdr.Kind)
	}
	if err == nil {
		var scratch []byte
		err = c.readMessage(hdr.Len, &scratch, &hi)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "subproc: module %q: bad hello from the parent: %v\n", name, err)
		return exitMisused
	}

	// The preamble goes out before any module code runs, so that bytes a
	// module writes to the pipe by mistake come after it, and the parent
	// reports them as such.
	c.flush()
	go c.writeLoop()
	// Two contexts: the ModuleFunc's, canceled as soon as the parent
	// begins to drain the child, so that long-lived handlers can end; and
	// the one every request's context derives from, canceled when the
	// parent says stop.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	moduleCtx, drain := context.WithCancel(ctx)
	defer drain()
	srv := newServer(ctx, drain, c, fds.accept, nil)
	srv.recvRing = fds.rings.down
	srv.stacks = fds.log
	readErr := make(chan error, 1)
	go func() {
		err := srv.readLoop()
		if err == io.EOF {
			// The parent is gone without saying stop: nobody is left to
			// answer, and the module may be stuck in its ModuleFunc or in
			// handlers. Leave now, and take the processes the module
			// started along: the child leads their process group, and
			// the parent, if it died, cannot kill it any more. SIGKILL
			// ends this process too; the exit is for a system where the
			// kill failed.
			syscall.Kill(0, syscall.SIGKILL)
			os.Exit(exitOrphaned)
		}
		readErr <- err
	}()

	env := &Env{
		Name:        hi.Name,
		Incarnation: hi.Incarnation,
		Slot:        hi.Slot,
		Config:      hi.Config,
		LogDir:      hi.LogDir,
		Logger:      slog.New(slog.NewTextHandler(fds.log, &slog.HandlerOptions{AddSource: true})),
	}
	h, err := initModule(moduleCtx, name, env)
	if err != nil {
		msg := err.Error()
		if len(msg) > maxReadyErr {
			msg = msg[:maxReadyErr] + " [cut]"
		}
		c.send(outFrame{kind: kindReady, msg: &ready{Pid: os.Getpid(), Err: msg}}, nil)
		c.stopWriting()
		<-c.wdone
		return exitFailed
	}
	srv.setHandler(h)
	c.send(outFrame{kind: kindReady, msg: &ready{Pid: os.Getpid()}}, nil)
	// The pages of the binary that the program's initialization touched
	// (every package's init function, most of which the module does not
	// use) leave the child's resident set, so that MemoryHigh and MemoryMax
	// count what the module uses; what it runs faults back in. It takes a
	// millisecond or two of a core, and its page faults and TLB flushes
	// slow the process down meanwhile: run beside the first request after
	// a restart, it delayed that request's answer by up to a millisecond.
	// It waits for dropDelay, which the first requests take much less than.
	time.AfterFunc(dropDelay, func() { dropFileMappings(false) })

	err = <-readErr
	cancel() // the requests' contexts, and the module's
	switch {
	case errors.Is(err, errStop):
		// The parent has drained its requests; finish what runs and go.
		// Their contexts are canceled; handlers that ignore that get
		// stopGrace, as no request waits for them any more.
		waitTimeout(&srv.active, stopGrace)
		c.stopWriting()
		<-c.wdone
		return exitOK
	default:
		fmt.Fprintf(os.Stderr, "subproc: module %q: reading from the parent: %v\n", name, err)
		return exitFailed
	}
}

// dropDelay is how long after it is ready a child drops the pages of its
// binary (see runChild): long enough for the requests that waited for it,
// short enough that a health check (Options.HealthInterval) rarely counts
// those pages against the memory limits.
const dropDelay = 50 * time.Millisecond

// initModule runs the module's ModuleFunc, turning a panic into an error.
func initModule(ctx context.Context, name string, env *Env) (h http.Handler, err error) {
	fn := lookup(name)
	if fn == nil {
		return nil, fmt.Errorf("module %q is not registered in the child: register it in an init function, so that the re-executed binary sees it too", name)
	}
	defer func() {
		if v := recover(); v != nil {
			fmt.Fprintf(os.Stderr, "subproc: module %q: panic in its ModuleFunc: %v\n%s", name, v, debug.Stack())
			h, err = nil, fmt.Errorf("panic: %v", v)
		}
	}()
	h, err = fn(ctx, env)
	if err == nil && h == nil {
		err = errors.New("ModuleFunc returned a nil handler and no error")
	}
	return h, err
}

// childFDs is what a child is given by its parent, once takeOverFDs has
// moved it out of the module's way.
type childFDs struct {
	in, out *os.File    // the protocol's ends
	log     *os.File    // Env.Logger's pipe
	accept  *acceptWord // the accept word
	rings   sharedRings // the body rings, if the parent gave them
}

// takeOverFDs moves the protocol off fds 0 and 1 and the log captures onto
// fds 1 and 2, and returns what the parent gave. It fails, touching
// nothing, if the fds Start sets up are missing.
func takeOverFDs() (fds childFDs, err error) {
	var st syscall.Stat_t
	for _, fd := range []int{0, 1, 2, fdStdout, fdLog, fdAccept} {
		if err := syscall.Fstat(fd, &st); err != nil {
			return childFDs{}, fmt.Errorf("file descriptor %d: %v", fd, err)
		}
		if fd == 0 && st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
			return childFDs{}, errors.New("stdin is not a pipe")
		}
	}
	if fds.accept, err = mapWord(fdAccept); err != nil {
		return childFDs{}, err
	}
	if syscall.Fstat(fdAccept, &st) == nil && st.Size == sharedSize() {
		// The parent gave this child rings (see allocateRing). If it
		// cannot map them, it fails: the parent may send chunks in the
		// down ring.
		if fds.rings, err = mapRings(fdAccept); err != nil {
			return childFDs{}, err
		}
	}
	dupe := func(fd int) (*os.File, error) {
		syscall.ForkLock.RLock()
		defer syscall.ForkLock.RUnlock()
		nfd, err := syscall.Dup(fd)
		if err != nil {
			return nil, err
		}
		syscall.CloseOnExec(nfd)
		return os.NewFile(uintptr(nfd), fmt.Sprintf("subproc-%d", fd)), nil
	}
	if fds.in, err = dupe(0); err != nil {
		return childFDs{}, err
	}
	if fds.out, err = dupe(1); err != nil {
		return childFDs{}, err
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		return childFDs{}, err
	}
	defer null.Close()
	if err := dup2(int(null.Fd()), 0); err != nil {
		return childFDs{}, err
	}
	if err := dup2(fdStdout, 1); err != nil {
		return childFDs{}, err
	}
	syscall.Close(fdStdout)
	syscall.Close(fdAccept) // the mapping stays
	syscall.CloseOnExec(fdLog)
	fds.log = os.NewFile(fdLog, "subproc-log")
	return fds, nil
}

// stopGrace bounds how long a child told to stop waits for handlers whose
// requests the parent has given up on.
const stopGrace = time.Second

// waitTimeout waits for wg, or for d, whichever comes first.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}
