package subprocprom

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"

	"github.com/fbbf71ac/subproc"
	"github.com/prometheus/client_golang/prometheus"
)

// This file holds the Collector: the metrics' descriptions, what Collect
// reads from each Handle's Stats, and the event counters Observe keeps.

// The fixed label values. A Collector reports each for every module, so
// that a series exists, at zero, before its first increment.
var (
	moduleStates = []string{"starting", "running", "unhealthy", "restarting", "stopping", "stopped"}
	childStates  = []string{"starting", "running", "unhealthy", "draining"}
	exitReasons  = []string{"crash", "health", "memory", "protocol", "stuck", "shutdown", "restart", "max-requests", "lifetime"}
	// recycleReasons are the reasons a ChildRecycling event can carry.
	recycleReasons = []string{"restart", "max-requests", "lifetime", "memory", "stuck"}
)

var (
	descReady = prometheus.NewDesc("subproc_ready",
		"1 if the module can take a request now (a child runs and the handle is not shutting down), else 0.",
		[]string{"module"}, nil)
	descModuleState = prometheus.NewDesc("subproc_module_state",
		"1 for the module's current state, 0 for the others.",
		[]string{"module", "state"}, nil)
	descChildren = prometheus.NewDesc("subproc_children",
		"Child processes of the module started and not yet reaped, by state.",
		[]string{"module", "state"}, nil)
	descInFlight = prometheus.NewDesc("subproc_in_flight",
		"Requests being served by the module, all children together.",
		[]string{"module"}, nil)
	descRequests = prometheus.NewDesc("subproc_requests_total",
		"Requests answered by a child of the module.",
		[]string{"module"}, nil)
	descFailures = prometheus.NewDesc("subproc_request_failures_total",
		"Requests the module failed, by outcome: bad_gateway (502), unavailable (503), timeout (504 or an abort at the deadline), aborted (cut off after the response started).",
		[]string{"module", "outcome"}, nil)
	descRestarts = prometheus.NewDesc("subproc_restarts_total",
		"Children started after a child died or failed to start.",
		[]string{"module"}, nil)
	descChildInFlight = prometheus.NewDesc("subproc_child_in_flight",
		"Requests the slot's children are serving.",
		[]string{"module", "slot"}, nil)
	descChildMemory = prometheus.NewDesc("subproc_child_resident_memory_bytes",
		"Resident memory of the slot's children at their last check, in bytes.",
		[]string{"module", "slot"}, nil)
	descChildHealth = prometheus.NewDesc("subproc_child_health_rtt_seconds",
		"Round trip of the slot's current child's last successful health check, in seconds.",
		[]string{"module", "slot"}, nil)
	descChildFailedChecks = prometheus.NewDesc("subproc_child_failed_health_checks",
		"Health checks the slot's current child failed in a row.",
		[]string{"module", "slot"}, nil)
	descChildStart = prometheus.NewDesc("subproc_child_start_time_seconds",
		"When the slot's current child became ready, in seconds since the Unix epoch.",
		[]string{"module", "slot"}, nil)
	descExits = prometheus.NewDesc("subproc_child_exits_total",
		"Children of the module that ended, by reason.",
		[]string{"module", "reason"}, nil)
	descRecycles = prometheus.NewDesc("subproc_child_recycles_total",
		"Graceful replacements of a child begun, by reason.",
		[]string{"module", "reason"}, nil)
	descHealthFailures = prometheus.NewDesc("subproc_health_check_failures_total",
		"Health checks of the module's children that failed.",
		[]string{"module"}, nil)
	descBackoffs = prometheus.NewDesc("subproc_backoffs_total",
		"Restarts of the module delayed because it keeps failing.",
		[]string{"module"}, nil)
)

// A Collector is a prometheus.Collector over the Handles added to it,
// with counters of the events given to Observe. It reads each Handle's
// Stats when it is collected, and starts no goroutine. The package
// documentation lists its metrics.
//
// The zero value is not usable; call NewCollector. A Collector is safe
// for concurrent use, by Observe from any number of modules' OnEvent
// goroutines while it is collected.
type Collector struct {
	mu      sync.Mutex                 // guards the fields below
	handles []*subproc.Handle          // in the order they were added
	modules map[string]*subproc.Handle // by module name
	events  map[string]*eventCounts    // by module name: every module added or observed
}

// eventCounts are the counters Observe keeps for one module.
type eventCounts struct {
	exits          map[string]uint64 // by reason
	recycles       map[string]uint64 // by reason
	healthFailures uint64
	backoffs       uint64
}

// NewCollector returns a Collector over handles, which may be none: a
// program adds a Handle once Start has returned it, while the Collector
// must exist before, for Options.OnEvent (see Observe). It panics, as Add
// does, if two handles run modules of the same name.
func NewCollector(handles ...*subproc.Handle) *Collector {
	c := &Collector{modules: make(map[string]*subproc.Handle), events: make(map[string]*eventCounts)}
	for _, h := range handles {
		c.Add(h)
	}
	return c
}

// Add makes the Collector report h's Stats from its next collection on.
// Adding a Handle twice has no effect. It panics if another Handle of the
// Collector runs a module of the same name, since their series would be
// the same; Remove the old one first.
func (c *Collector) Add(h *subproc.Handle) {
	name := h.Stats().Module
	c.mu.Lock()
	defer c.mu.Unlock()
	switch old := c.modules[name]; {
	case old == h:
		return
	case old != nil:
		panic(fmt.Sprintf("subprocprom: Collector.Add: the Collector already has a Handle of module %q; Remove it first, or give the modules distinct names", name))
	}
	c.handles = append(c.handles, h)
	c.modules[name] = h
	c.countsLocked(name)
}

// Remove stops the Collector reporting h's Stats, as for a Handle that
// has been shut down. The event counters of h's module stay, and go on
// counting for the module's next Handle. Removing a Handle the Collector
// does not have has no effect.
func (c *Collector) Remove(h *subproc.Handle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := slices.Index(c.handles, h)
	if i < 0 {
		return
	}
	c.handles = slices.Delete(c.handles, i, i+1)
	for name, m := range c.modules {
		if m == h {
			delete(c.modules, name)
		}
	}
}

// Observe counts ev in the event metrics of its module (see the package
// documentation). Give it every event of the modules the Collector
// reports, by setting Options.OnEvent to it, or to the function that
// OnEvent returns, before Start. Events of a module the Collector has no
// Handle of are counted all the same, and reported.
func (c *Collector) Observe(ev subproc.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.countsLocked(ev.Module)
	reason := ev.Reason
	if reason == "" {
		reason = "unknown"
	}
	switch ev.Kind {
	case subproc.ChildExited:
		n.exits[reason]++
	case subproc.ChildRecycling:
		n.recycles[reason]++
	case subproc.ChildUnhealthy:
		n.healthFailures++
	case subproc.ModuleBackoff:
		n.backoffs++
	}
}

// OnEvent returns a function for Options.OnEvent that gives each event to
// Observe, then to next, unless next is nil.
func (c *Collector) OnEvent(next func(subproc.Event)) func(subproc.Event) {
	return func(ev subproc.Event) {
		c.Observe(ev)
		if next != nil {
			next(ev)
		}
	}
}

// countsLocked returns the event counters of module name, creating them,
// with every fixed reason at zero, the first time.
func (c *Collector) countsLocked(name string) *eventCounts {
	n := c.events[name]
	if n == nil {
		n = &eventCounts{exits: make(map[string]uint64), recycles: make(map[string]uint64)}
		for _, r := range exitReasons {
			n.exits[r] = 0
		}
		for _, r := range recycleReasons {
			n.recycles[r] = 0
		}
		c.events[name] = n
	}
	return n
}

// Describe sends the descriptions of every metric the Collector reports,
// whatever its Handles.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descReady, descModuleState, descChildren, descInFlight, descRequests,
		descFailures, descRestarts, descChildInFlight, descChildMemory,
		descChildHealth, descChildFailedChecks, descChildStart, descExits,
		descRecycles, descHealthFailures, descBackoffs,
	} {
		ch <- d
	}
}

// Collect sends the metrics of every Handle, read from its Stats now, and
// the event counters of every module added or observed.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	handles := slices.Clone(c.handles)
	type counted struct {
		module string
		counts eventCounts
	}
	var events []counted
	for name, n := range c.events {
		events = append(events, counted{name, eventCounts{
			exits:          maps.Clone(n.exits),
			recycles:       maps.Clone(n.recycles),
			healthFailures: n.healthFailures,
			backoffs:       n.backoffs,
		}})
	}
	c.mu.Unlock()

	// Stats and Ready take the handle's lock: not under c.mu, so that a
	// slow scrape never holds up Observe.
	for _, h := range handles {
		collectHandle(ch, h.Stats(), h.Ready())
	}
	for _, e := range events {
		for r, v := range e.counts.exits {
			ch <- prometheus.MustNewConstMetric(descExits, prometheus.CounterValue, float64(v), e.module, r)
		}
		for r, v := range e.counts.recycles {
			ch <- prometheus.MustNewConstMetric(descRecycles, prometheus.CounterValue, float64(v), e.module, r)
		}
		ch <- prometheus.MustNewConstMetric(descHealthFailures, prometheus.CounterValue, float64(e.counts.healthFailures), e.module)
		ch <- prometheus.MustNewConstMetric(descBackoffs, prometheus.CounterValue, float64(e.counts.backoffs), e.module)
	}
}

// collectHandle sends the metrics of one Handle, from st and ready.
func collectHandle(ch chan<- prometheus.Metric, st subproc.Stats, ready bool) {
	m := st.Module
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{m}, labels...)...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, append([]string{m}, labels...)...)
	}

	gauge(descReady, b2f(ready))
	for _, s := range moduleStates {
		gauge(descModuleState, b2f(st.State == s), s)
	}
	byState := make(map[string]int)
	for _, cs := range st.Children {
		byState[cs.State]++
	}
	for _, s := range childStates {
		gauge(descChildren, float64(byState[s]), s)
	}
	gauge(descInFlight, float64(st.InFlight))
	counter(descRequests, float64(st.Requests))
	counter(descFailures, float64(st.BadGateway), "bad_gateway")
	counter(descFailures, float64(st.Unavailable), "unavailable")
	counter(descFailures, float64(st.Timeouts), "timeout")
	counter(descFailures, float64(st.Aborted), "aborted")
	counter(descRestarts, float64(st.Restarts))

	for _, sl := range slots(st.Children) {
		slot := strconv.Itoa(sl.slot)
		gauge(descChildInFlight, float64(sl.inFlight), slot)
		if sl.memory > 0 {
			gauge(descChildMemory, float64(sl.memory), slot)
		}
		cur := sl.current
		if cur.LastHealth > 0 {
			gauge(descChildHealth, cur.LastHealth.Seconds(), slot)
		}
		gauge(descChildFailedChecks, float64(cur.FailedChecks), slot)
		if !cur.Started.IsZero() {
			gauge(descChildStart, float64(cur.Started.UnixNano())/1e9, slot)
		}
	}
}

// A slotStats sums up the children of one slot.
type slotStats struct {
	slot     int
	inFlight int                // all of the slot's children
	memory   int64              // all of the slot's children
	current  subproc.ChildStats // the newest child past starting, or the newest
}

// slots groups children, oldest first as Stats lists them, by slot, in the
// order of the slots.
func slots(children []subproc.ChildStats) []slotStats {
	var out []slotStats
	index := make(map[int]int) // slot → its place in out
	for _, cs := range children {
		i, ok := index[cs.Slot]
		if !ok {
			i = len(out)
			index[cs.Slot] = i
			out = append(out, slotStats{slot: cs.Slot, current: cs})
		}
		sl := &out[i]
		sl.inFlight += cs.InFlight
		sl.memory += cs.Memory
		if cs.State != "starting" || sl.current.State == "starting" {
			sl.current = cs // newer than the one before
		}
	}
	slices.SortFunc(out, func(a, b slotStats) int { return a.slot - b.slot })
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
