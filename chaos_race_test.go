//go:build race

package subproc

// raceEnabled: the race detector's shadow memory inflates a child's RSS.
const raceEnabled = true
