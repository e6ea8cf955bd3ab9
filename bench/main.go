// Command bench compares ways of serving a net/http handler from a child
// process: in the server process itself (inproc, the ceiling), behind
// httputil.ReverseProxy over a unix socket (uds), through hashicorp/go-plugin's
// net/rpc protocol (goplugin), through a raw pipe (pipe, streaming only), and
// through this repository's library (subproc).
//
// Run it from this directory:
//
//	go run . -out results         # the full run: 3 interleaved rounds, about 7 minutes
//	go run . -quick -out results  # every workload briefly, once: under a minute
//
// The peers run interleaved: in each round every peer in turn, each with a
// freshly started server process, and the report gives each figure's
// median over the rounds and each ratio to inproc as the median of the
// per-round ratios, with their range.
//
// One binary plays every role; the role is chosen by the BENCH_ROLE
// environment variable. Without it the process is the driver: it starts a
// server process per peer (the binary re-executed with BENCH_ROLE=server),
// generates the load itself over loopback TCP, and writes results.md,
// results.json and results.svg. The server process starts the peer's child,
// again the binary re-executed (BENCH_ROLE=uds-child, goplugin-child,
// pipe-child, or subproc's own child mode). So load generator, server
// parent and child are three distinct processes. See README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/fbbf71ac/subproc"
)

// Environment variables that select a process's role.
const (
	envRole   = "BENCH_ROLE"   // "", "server", "uds-child", "goplugin-child", "pipe-child"
	envPeer   = "BENCH_PEER"   // the server's peer
	envSocket = "BENCH_SOCKET" // the unix socket of a uds child
)

func init() {
	subproc.Register("bench", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return newHandler(), nil
	})
}

func main() {
	subproc.Main()
	if runRoleFromEnv() {
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if cfg.From != "" {
		err = replot(cfg.From, cfg.Out, os.Stdout)
	} else {
		err = drive(cfg, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// runRoleFromEnv runs the role that envRole names, if any, exiting with
// status 1 if it fails, and reports whether there was one.
func runRoleFromEnv() bool {
	role := os.Getenv(envRole)
	if role == "" {
		return false
	}
	// The role is this process's alone: the children it starts get their
	// own, even where (as in go-plugin) the parent's environment is
	// appended after theirs.
	os.Unsetenv(envRole)
	if err := runRole(role); err != nil {
		fmt.Fprintf(os.Stderr, "bench %s: %v\n", role, err)
		os.Exit(1)
	}
	return true
}

// runRole runs a process that is not the driver; it returns when the
// process should exit.
func runRole(role string) error {
	switch role {
	case "server":
		peer := os.Getenv(envPeer)
		os.Unsetenv(envPeer)
		return runServer(peer)
	case "uds-child":
		return runUDSChild(os.Getenv(envSocket))
	case "goplugin-child":
		runGoPluginChild()
		return nil
	case "pipe-child":
		return runPipeChild(os.Stdin, os.Stdout)
	}
	return fmt.Errorf("unknown %s %q", envRole, role)
}

// Config is what the driver measures: the workloads' parameters.
type Config struct {
	Out         string        `json:"-"`
	From        string        `json:"-"`
	Quick       bool          `json:"quick"`
	Peers       []string      `json:"peers"`
	Rounds      int           `json:"rounds"` // every peer runs once per round, in Peers's order
	Warmup      time.Duration `json:"warmup_ns"`
	Duration    time.Duration `json:"duration_ns"`
	EchoBytes   int           `json:"echo_bytes"`
	EchoClients int           `json:"echo_clients"`
	StreamBytes int64         `json:"stream_bytes"`
	StreamChunk int           `json:"stream_chunk"` // also the WebSocket stream's message size
	Kills       int           `json:"kills"`
	WSEchoBytes int           `json:"ws_echo_bytes"` // the WebSocket echo's message size
	// MaxSteal is the share of the machine's CPU time, in percent, that
	// the hypervisor may steal during a timed load or stream before it is
	// timed again, at most Retimes more times; the least disturbed timing
	// counts. 0 times every load once.
	MaxSteal float64 `json:"max_steal_pct"`
	Retimes  int     `json:"retimes"`
	// Workloads, if not empty, limits the run to these of allWorkloads.
	Workloads []string `json:"workloads,omitempty"`
}

// allWorkloads lists the workloads a peer runs, in order ("small" also
// samples memory, for (e)).
var allWorkloads = []string{"small", "echo", "stream", "ws", "restart"}

// runs reports whether the run includes workload w.
func (cfg Config) runs(w string) bool {
	return len(cfg.Workloads) == 0 || slices.Contains(cfg.Workloads, w)
}

// measures reports whether the run measures the metrics of workload w,
// which may be "rss", measured during "small".
func (cfg Config) measures(w string) bool {
	if w == "rss" {
		w = "small"
	}
	return cfg.runs(w)
}

// allPeers lists the peers in the order they run and are reported.
var allPeers = []string{"inproc", "uds", "goplugin", "pipe", "subproc"}

func parseFlags(args []string) (Config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	out := fs.String("out", "results", "directory for results.md, results.json, results.svg (and tmp/ with the servers' logs)")
	from := fs.String("from", "", "measure nothing: rewrite results.md and results.svg (to -out) from this results.json")
	quick := fs.Bool("quick", false, "run every workload briefly, in one round (smoke test, under a minute)")
	peers := fs.String("peers", strings.Join(allPeers, ","), "comma-separated peers to run, in this order in each round")
	rounds := fs.Int("rounds", 0, "rounds of every peer in turn (default 3, quick 1)")
	warmup := fs.Duration("warmup", 0, "warmup before each timed load (default 1s, quick 250ms)")
	dur := fs.Duration("duration", 0, "length of each timed load (default 5s, quick 1s)")
	stream := fs.Int64("stream-bytes", 0, "size of the /stream response and of the WebSocket stream (default 1 GiB, quick 64 MiB)")
	kills := fs.Int("kills", 0, "SIGKILLs of the child for the restart workload (default 7, quick 3)")
	maxSteal := fs.Float64("max-steal", 5, "time a load or stream again if the hypervisor stole more than this percentage of the machine's CPU during it (0: never)")
	retimes := fs.Int("retimes", -1, "how many times at most to time a disturbed load or stream again (default 2, quick 0)")
	workloads := fs.String("workloads", "", "comma-separated workloads to run (of "+strings.Join(allWorkloads, ", ")+"; default all)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *maxSteal < 0 || *maxSteal > 100 {
		return Config{}, fmt.Errorf("-max-steal %g: want a percentage from 0 to 100", *maxSteal)
	}
	if *rounds < 0 {
		return Config{}, fmt.Errorf("-rounds %d: want at least 1 (0 for the default)", *rounds)
	}
	cfg := Config{
		Out: *out, From: *from, Quick: *quick,
		Rounds: 3,
		Warmup: time.Second, Duration: 5 * time.Second,
		EchoBytes: 64 << 10, EchoClients: 16,
		StreamBytes: 1 << 30, StreamChunk: 64 << 10,
		Kills:       7,
		WSEchoBytes: 64,
		MaxSteal:    *maxSteal, Retimes: 2,
	}
	if cfg.Quick {
		cfg.Rounds, cfg.Warmup, cfg.Duration, cfg.StreamBytes, cfg.Kills, cfg.Retimes = 1, 250*time.Millisecond, time.Second, 64<<20, 3, 0
	}
	if *retimes >= 0 {
		cfg.Retimes = *retimes
	}
	if *rounds > 0 {
		cfg.Rounds = *rounds
	}
	if *warmup > 0 {
		cfg.Warmup = *warmup
	}
	if *dur > 0 {
		cfg.Duration = *dur
	}
	if *stream > 0 {
		cfg.StreamBytes = *stream
	}
	if *kills > 0 {
		cfg.Kills = *kills
	}
	var err error
	if cfg.Peers, err = parseList("peer", *peers, allPeers); err != nil {
		return Config{}, err
	}
	if len(cfg.Peers) == 0 {
		return Config{}, fmt.Errorf("no peers")
	}
	if cfg.Workloads, err = parseList("workload", *workloads, allWorkloads); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// parseList returns the comma-separated names in s, each of which must be
// one of all (what names the kind, for the error).
func parseList(what, s string, all []string) ([]string, error) {
	var names []string
	for _, n := range strings.Split(s, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if !slices.Contains(all, n) {
			return nil, fmt.Errorf("unknown %s %q (have %s)", what, n, strings.Join(all, ", "))
		}
		names = append(names, n)
	}
	return names, nil
}
