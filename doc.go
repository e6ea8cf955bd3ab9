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
// # Streaming and flow control
//
// Bodies move in chunks of 64 KiB, and each request has a window of 512 KiB
// in each direction: a client that reads slowly, or a handler that does not
// read its body, stalls only its own request, and neither process buffers
// more than a window per request.
//
// # Failures
//
// The parent notices a child's exit at once. Requests in flight get 502 Bad
// Gateway if their response had not started, an aborted connection if it
// had; a request the child had not yet taken goes to the next child
// instead, as the module never saw it. The module restarts; requests that
// arrive meanwhile wait for the new child up to Options.RestartWait, then
// get 503 Service Unavailable with
// Retry-After. A child that fails Options.HealthFailures health checks in a
// row is killed and restarted. Each child is an incarnation with its own
// pipes, so messages of an earlier incarnation never reach a later one's
// requests. A child that breaks the protocol is killed and restarted.
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
// module's name.
package subproc
