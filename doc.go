// Package subproc runs some of an HTTP server's handlers — modules — in
// child processes, so that a module that crashes, leaks, hangs or blocks its
// runtime cannot take the server down with it.
//
// The parent forwards each request to the module's child and streams the
// answer back; it watches the child, restarts it when it dies or stops
// answering health checks, and fails the requests the dead child can no
// longer answer. The child is the same binary, re-executed: a module is
// registered by name in both, and Main, the first statement of main, makes
// the child run it.
//
//	func init() { subproc.Register("logs", newLogsModule) }
//
//	func main() {
//		subproc.Main() // in a child, runs the module and exits
//		h, err := subproc.Start(ctx, "logs", subproc.Options{LogDir: dir})
//		if err != nil {
//			log.Fatal(err)
//		}
//		defer h.Close()
//		mux.Handle("GET /api/logs", h.Route("/api/logs", http.MethodGet))
//		log.Fatal(http.ListenAndServe(addr, mux))
//	}
//
// # Transparency
//
// A handler behaves through a Handle as it does served in-process by
// net/http: the request's method, URL, headers, Host, body (streamed),
// content length and trailers reach it; its status, headers, body, flushes
// (http.Flusher, http.ResponseController) and trailers reach the client.
// Hop-by-hop headers are removed as httputil.ReverseProxy removes them. A
// handler that panics before writing anything gives the client 500 Internal
// Server Error; after, the client's connection is aborted. Either way the
// child survives.
//
// # Upgrades and WebSocket
//
// A request that asks for a protocol upgrade reaches the module with its
// Connection and Upgrade headers, as httputil.ReverseProxy forwards it. A
// handler that hijacks its connection (http.Hijacker, or
// http.ResponseController.Hijack), as WebSocket libraries do, gets a
// net.Conn whose bytes flow to and from the client's connection in both
// directions under the same flow control; its deadlines, Close,
// CloseWrite, LocalAddr and RemoteAddr behave as on a real connection, and
// a handler may hijack after its response started, as in net/http. The
// parent hijacks the client's HTTP/1.1 connection; for an HTTP/2 request
// Hijack fails, as it does in-process. When the child dies its upgraded
// connections close; when it drains, the ModuleFunc's context is canceled
// so that the module can close them itself (with a WebSocket close frame),
// and those still open at the grace's end are closed. RequestTimeout ends
// an upgraded request's context but not its connection.
//
// # Streaming and flow control
//
// Bodies move in chunks of 64 KiB with flow control per request and
// direction, as in HTTP/2: a request's window starts at one chunk and
// doubles, up to 1 MiB, while its reader keeps up, the growth being taken
// from a budget of 16 MiB per module and direction that all its requests
// share. A client that reads slowly, or a handler that does not read its
// body, stalls only its own request; what parent and child buffer for the
// bodies of all of a module's requests together is at most 16 MiB plus 64
// KiB per request in flight.
//
// On Linux, chunks of 16 KiB or more go through memory that parent and
// child share, in two rings of 16 chunks per child, one each way, instead
// of through the pipes: a chunk costs one copy instead of up to four. The
// parent never parses what lives there and checks each reference to it,
// so a module that overwrites it garbles only its own bodies.
//
// A message too large for the pipe's frames (8 MiB) fails its own request,
// never the others: a request head that large gets 431 Request Header
// Fields Too Large before it is sent, and a response whose head or
// trailers are that large fails the handler's write and gives the client
// 502 Bad Gateway, or an aborted connection once the response had started.
//
// # Failures
//
// The parent notices a child's exit at once. Requests in flight get 502 Bad
// Gateway if their response had not started, an aborted connection if it
// had; a request the child had not yet taken goes to another child
// instead, as the module never saw it. The child is restarted at once if
// it had served for a second or more, and so is the first of children that
// die younger; each further one in a row waits twice as long as the last,
// from 100ms up to Options.MaxRestartDelay, whether or not it answered
// requests, so that a request that crashes the module, retried by its
// clients, cannot make it restart more than a few times a second. Requests
// that find no child wait for one up to Options.RestartWait, then get 503
// Service Unavailable with Retry-After. A child that fails
// Options.HealthFailures health checks in a row is sent SIGQUIT, so that
// the Go runtime writes its goroutines' stacks to its stderr, and a second
// later killed and restarted (a stopped child is killed at once); Stats
// shows it "unhealthy" from its first failed check. Each child is an
// incarnation with its own pipes, so messages of an earlier incarnation
// never reach a later one's requests. A child that breaks the protocol is
// killed and restarted.
//
// # Pools, rolling restarts and recycling
//
// With Options.Children above one, a module runs in that many children, each
// supervised, health-checked, recycled and restarted on its own; a request
// goes to the least loaded child that passes its health checks, so a crash
// fails only the requests of the child that crashed. Env.Slot tells a child
// which slot it fills, and Env.Incarnation numbers every child of a Handle.
//
// Handle.Restart replaces the children one at a time without failing a
// request: a new child starts, and once it is ready new requests go to it
// while the old one drains and stops; a pool of one thus briefly runs two
// children. If the new child cannot start, the old one keeps serving and
// Restart returns the *StartError. Options.MaxRequests, Options.MaxLifetime
// (each lowered at random by up to 10%, so that a pool is not recycled all
// at once), Options.MemoryHigh and a stuck handler (see Limits) replace a
// child the same way; a replacement is never counted as a crash.
//
// # Draining
//
// A drain (Shutdown, Restart, a recycle) cancels the context the child's
// ModuleFunc was given at once, so that long-lived handlers, such as event
// streams and WebSockets, can end; the other requests in flight run on
// until they end or the grace period does (Shutdown's context, or
// Options.ShutdownTimeout for a replaced child), when their contexts are
// canceled in the child and, half a second later, the child is killed.
// Health checks go on during a drain, so a child that hangs while draining
// is killed, and Shutdown returns whatever the child does, once the
// requests in flight end. A request that never ends (a stream whose handler
// ignores the ModuleFunc's context, to a client that reads on) holds a
// Shutdown whose context has no deadline, as it holds http.Server's.
//
// # Limits
//
// Options.MemoryHigh and MemoryMax bound a child's resident memory, read
// every HealthInterval: past MemoryHigh it is replaced gracefully, past
// MemoryMax killed at once. Unless the environment sets GOMEMLIMIT, such a
// child gets one of 90% of the lower limit, so that the Go runtime collects
// before the limit. A request's deadline, its own or Options.RequestTimeout,
// is its handler's in the child too; at the deadline the client gets 504
// Gateway Timeout, or an aborted response once it had started. A handler
// still running Options.StuckTimeout after its request ended makes its
// child stuck: the child's goroutine stacks go to the module's log, a
// ChildStuck event is posted, and the child is replaced; the parent has
// already let go of what it held for such requests. Options.MaxInFlight and
// MaxQueued bound the requests served and waiting; the rest get 503 with
// Retry-After at once.
//
// # Events and statistics
//
// Options.OnEvent receives every event of a module's life (see Event):
// starts, failed health checks, stuck handlers, recycling, exits, backoff
// and degraded states, each with a reason and, for exits, the child's last
// lines of output. Handle.Stats describes each child and counts the
// requests by outcome. Handle.Ready answers a readiness probe.
//
// # The child process
//
// The child is the running binary, started again with its path as its only
// argument, in Options.Dir (the parent's working directory by default) with
// Options.Env (the parent's environment by default) and variables of
// subproc's, which Main removes before module code runs. It keeps no other
// file descriptor than the pipes Main takes over. Go opens every file with
// close-on-exec, but a process can hold some without it, inherited from
// its own parent (a socket-activation listener) or opened by C code: on
// Linux the parent lists those it holds at its first Start, and Main
// closes them in each child before the ModuleFunc runs (package init
// functions, which run before Main, still see them), as the watcher does:
// a module cannot accept the parent's clients on an inherited listener.
// One that the parent opens without close-on-exec after its first Start is
// not listed, and a child inherits it.
//
// # Processes
//
// Children run in their own process group, so a terminal's Ctrl-C reaches
// only the parent, which should then call Shutdown. A child exits when its
// parent dies, even by SIGKILL: it sees its stdin close, and on Linux the
// kernel also kills it (a parent-death signal), as does the watcher (see
// below) elsewhere, so even a stopped child does not outlive its parent.
//
// Processes a module starts die with its child. They inherit the child's
// process group, and the parent kills the group when the child ends,
// however it ends: a stop, a crash, a kill. For when the parent itself
// dies, each parent process has a watcher, a re-execution of the binary,
// in a process group of its own, that runs no module code: the parent
// tells it the group of each child it starts and of each child it reaps,
// and when the parent dies, however it dies, the watcher sees its own
// stdin close and kills the groups of every child left, so that the
// processes of a child die with it whatever its state, running, stopped or
// wedged. (A running child also kills its group as it sees its stdin
// close, where no parent-death signal has killed it first.) The watcher is
// one process for the whole parent, whatever its Handles and children,
// with about 1 MiB of memory of its own; the first Start starts it, it
// runs until the parent ends, and the parent replaces it if it is killed.
// Main runs it.
//
// A process that leaves the group escapes that kill: one that calls setsid
// or setpgid, as a daemon that double-forks does, outlives the child, and
// may keep files, ports or the module's output pipes open. A module that
// starts such processes and needs them contained must contain them itself:
// on Linux, with a parent-death signal (syscall.SysProcAttr.Pdeathsig, from
// a goroutine locked to its thread, as the signal comes when the thread
// that started the process ends), or in a cgroup of their own that it
// kills. A program run by systemd with KillMode=control-group, the default,
// has all of its processes killed when it stops, escapees included.
//
// # Logs
//
// With Options.LogDir set, <LogDir>/<name>.log holds Env.Logger's records,
// and <name>.out and <name>.err what the module writes to its stdout and
// stderr; every incarnation appends, and files rotate by size. With LogDir
// empty, all of it goes to Options.Stderr, each line prefixed with the
// module's name and its control characters escaped, so that a module cannot
// rewrite the terminal. In a pool, each line also says which child wrote
// it (its slot and pid). A write that fails, on a full disk for instance,
// loses the line but not the module: the parent reports it through
// Options.Logger, at most every 10 seconds, and writing resumes by itself.
//
// # Routes
//
// Handle.Route(path, method) matches as an http.ServeMux with the one
// pattern "METHOD path" would: wildcards ({id}), a final {rest...}, {$} and
// a trailing slash for a subtree; another path gets 404, another method 405
// with an Allow header; a bad path or method panics, as ServeMux.Handle
// does. The pattern and path values the parent matched, with Route or with
// its own ServeMux, reach the child's request: r.Pattern and r.PathValue
// read as they would in-process.
//
// # Testing
//
// A module's tests use the same pattern as a program: TestMain calls Main
// first, so that the test binary can be its own child. Package subproctest
// does it for tests (subproctest.Main(m)), makes children skip the race
// detector's second-long exit sleep, and has Start, which fails the test
// with the *StartError and checks at cleanup that no child is left, and
// Kill and Freeze, to test what a module's clients see when its child
// crashes or hangs.
package subproc
