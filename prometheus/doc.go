// Package subprocprom exports the state of subproc modules as Prometheus
// metrics. It is a Go module of its own, so that the library's go.mod
// stays free of github.com/prometheus/client_golang; its package name
// differs from its directory so that it does not shadow client_golang's
// prometheus package:
//
//	import subprocprom "github.com/fbbf71ac/subproc/prometheus"
//
// A Collector reads each Handle's Stats at scrape time (it starts no
// goroutine and keeps no copy of them), and counts the events it is given
// through Observe, which a program chains into Options.OnEvent before
// Start, as the events are the only record of why children ended:
//
//	c := subprocprom.NewCollector()
//	h, err := subproc.Start(ctx, "logs", subproc.Options{OnEvent: c.OnEvent(nil)})
//	...
//	c.Add(h)
//	prometheus.MustRegister(c)
//	mux.Handle("GET /metrics", promhttp.Handler())
//
// # Metrics
//
// Every metric has the label module, the module's name. Per-child metrics
// are labelled slot (0 … Options.Children-1), not by process id, so that
// a restart does not start a new series. A slot briefly holds two children
// while one replaces the other (Restart, recycling): then the slot's
// in-flight requests and memory add up both, and its other values are
// those of its current child, the newest one that is past starting.
//
// From Handle.Stats and Handle.Ready, at scrape time:
//
//	subproc_ready                            gauge    module
//		1 if the module can take a request now (Handle.Ready), else 0.
//	subproc_module_state                     gauge    module, state
//		1 for the module's state (Stats.State: starting, running,
//		unhealthy, restarting, stopping, stopped), 0 for the others.
//	subproc_children                         gauge    module, state
//		Child processes started and not yet reaped, by state: starting,
//		running, unhealthy (failed its last health check), draining.
//	subproc_in_flight                        gauge    module
//		Requests being served, all children together.
//	subproc_requests_total                   counter  module
//		Requests answered by a child (Stats.Requests).
//	subproc_request_failures_total           counter  module, outcome
//		Requests that failed, by outcome: bad_gateway (502: the child
//		died before it answered), unavailable (503: no child in time,
//		shed by MaxInFlight, or shut down), timeout (504, or an abort,
//		by RequestTimeout or the request's deadline), aborted (a response
//		cut off after it had started). The outcomes exclude each other,
//		but not subproc_requests_total: a request the child ended counts
//		there, though the client got a failure, as for a response the
//		child itself aborted (a handler's panic after it wrote) or one
//		that it ended just after the deadline.
//	subproc_restarts_total                   counter  module
//		Children started after a child died or failed to start
//		(Stats.Restarts); a graceful replacement is not a restart.
//	subproc_child_in_flight                  gauge    module, slot
//		Requests the slot's children are serving.
//	subproc_child_resident_memory_bytes      gauge    module, slot
//		Resident memory of the slot's children at their last check (every
//		Options.HealthInterval); absent where the system does not tell.
//	subproc_child_health_rtt_seconds         gauge    module, slot
//		Round trip of the current child's last successful health check;
//		absent before its first.
//	subproc_child_failed_health_checks       gauge    module, slot
//		Health checks the current child failed in a row.
//	subproc_child_start_time_seconds         gauge    module, slot
//		When the current child became ready, in seconds since the Unix
//		epoch; absent while it starts.
//
// From the events given to Observe (zero until the first; the reasons are
// Event.Reason's fixed words, each present from the start so that rates
// work):
//
//	subproc_child_exits_total                counter  module, reason
//		Children that ended, by Event.Reason: crash (it died, or a
//		replacement failed to start), health (killed after failed
//		health checks), memory (killed past MemoryMax), protocol (killed
//		for a broken message); and for a child drained and stopped, why
//		it was: shutdown, restart, max-requests, lifetime, memory
//		(MemoryHigh), stuck.
//	subproc_child_recycles_total             counter  module, reason
//		Graceful replacements begun, by reason: restart, max-requests,
//		lifetime, memory, stuck.
//	subproc_health_check_failures_total      counter  module
//		Failed health checks (ChildUnhealthy events).
//	subproc_backoffs_total                   counter  module
//		Restarts delayed because the module keeps failing (ModuleBackoff).
package subprocprom
