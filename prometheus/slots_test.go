package subprocprom

import (
	"testing"
	"time"

	"github.com/fbbf71ac/subproc"
	"github.com/stretchr/testify/assert"
)

// TestSlots checks how the children of a slot add up, in each moment of a
// replacement, where a slot holds two.
func TestSlots(t *testing.T) {
	t0 := time.Unix(1000, 0)
	child := func(incarnation, slot int, state string, inFlight int, memory int64) subproc.ChildStats {
		cs := subproc.ChildStats{Pid: 100 + incarnation, Incarnation: incarnation, Slot: slot, State: state, InFlight: inFlight, Memory: memory}
		if state != "starting" {
			cs.Started = t0.Add(time.Duration(incarnation) * time.Second)
		}
		return cs
	}
	for _, tt := range []struct {
		name     string
		children []subproc.ChildStats // oldest first, as Stats lists them
		want     []slotStats
	}{
		{"none", nil, nil},
		{"a pool", []subproc.ChildStats{child(1, 1, "running", 2, 10), child(2, 0, "unhealthy", 0, 20)}, []slotStats{
			{slot: 0, inFlight: 0, memory: 20, current: child(2, 0, "unhealthy", 0, 20)},
			{slot: 1, inFlight: 2, memory: 10, current: child(1, 1, "running", 2, 10)},
		}},
		{"replacement starting: the old child is current", []subproc.ChildStats{child(0, 0, "running", 3, 10), child(1, 0, "starting", 0, 5)}, []slotStats{
			{slot: 0, inFlight: 3, memory: 15, current: child(0, 0, "running", 3, 10)},
		}},
		{"old child draining: the new one is current", []subproc.ChildStats{child(0, 0, "draining", 1, 10), child(1, 0, "running", 2, 5)}, []slotStats{
			{slot: 0, inFlight: 3, memory: 15, current: child(1, 0, "running", 2, 5)},
		}},
		{"two draining and a new one", []subproc.ChildStats{child(0, 0, "draining", 1, 10), child(1, 0, "draining", 1, 10), child(2, 0, "running", 1, 10)}, []slotStats{
			{slot: 0, inFlight: 3, memory: 30, current: child(2, 0, "running", 1, 10)},
		}},
		{"restarting after a crash", []subproc.ChildStats{child(3, 0, "starting", 0, 0)}, []slotStats{
			{slot: 0, current: child(3, 0, "starting", 0, 0)},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, slots(tt.children))
		})
	}
}
