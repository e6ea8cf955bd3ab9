//go:build !race

package subproc

const raceEnabled = false
