package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// This file holds GET /api/live, the stream the page follows: a
// text/event-stream of three kinds of event, each flushed as it is written.
//
//	event: event    one event of a module, as it happens (an eventView),
//	                with its number as the id, so that a client that
//	                reconnects (EventSource does, by itself) gets the events
//	                after its Last-Event-ID, and no event twice
//	event: state    every module's status, as GET /api/state without the
//	                events, every stateInterval and right after events
//	event: metrics  each module's history by name (a seriesView), every
//	                metricsInterval
//
// It ends when the client goes away or the dashboard begins to shut down.

// Intervals of /api/live.
const (
	stateInterval   = 250 * time.Millisecond
	metricsInterval = time.Second
)

// serveLive answers GET /api/live.
func (s *server) serveLive(w http.ResponseWriter, r *http.Request) {
	var last uint64 // the last event sent
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		last, _ = strconv.ParseUint(id, 10, 64) // a bad one counts as none
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	// A client that loses the stream comes back a second later.
	io.WriteString(w, "retry: 1000\n\n")

	stateTick := time.NewTicker(stateInterval)
	defer stateTick.Stop()
	metricsTick := time.NewTicker(metricsInterval)
	defer metricsTick.Stop()
	sendState, sendMetrics := true, true
	for {
		events, changed := s.events.since(last)
		for _, e := range events {
			if err := writeSSE(w, strconv.FormatUint(e.Seq, 10), "event", e); err != nil {
				return
			}
			last = e.Seq
		}
		if len(events) > 0 {
			sendState = true // what the events changed shows at once
		}
		if sendState {
			if err := writeSSE(w, "", "state", s.state(time.Now())); err != nil {
				return
			}
		}
		if sendMetrics {
			series := make(map[string]seriesView)
			now := time.Now()
			for _, m := range s.modules {
				if m.metrics != nil {
					series[m.name] = m.metrics.series(now)
				}
			}
			if err := writeSSE(w, "", "metrics", series); err != nil {
				return
			}
		}
		if err := rc.Flush(); err != nil {
			return
		}
		sendState, sendMetrics = false, false
		select {
		case <-r.Context().Done():
			return
		case <-s.closing.Done():
			return
		case <-changed:
		case <-stateTick.C:
			sendState = true
		case <-metricsTick.C:
			sendMetrics = true
		}
	}
}

// writeSSE writes one server-sent event of kind with v as its JSON data,
// and id unless it is "".
func writeSSE(w io.Writer, id, kind string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if id != "" {
		if _, err := fmt.Fprintf(w, "id: %s\n", id); err != nil {
			return err
		}
	}
	_, err = fmt.Fprintf(w, "event: %s\ndata: %s\n\n", kind, data)
	return err
}
