package main

import "slices"

// Rounds and their summary. Single runs on a shared 2-core machine move by
// 15–20%, so the driver runs every peer once per round, the peers
// interleaved, and reports medians over the rounds: of each figure, and of
// each per-round ratio to inproc (whose figure in the same round shared
// that round's conditions), with the ratios' range.

// Round is the raw figures of one round: every peer once, in order.
type Round struct {
	Round int          `json:"round"` // from 1
	Peers []PeerResult `json:"peers"`
}

// peer returns the round's result of the named peer, or nil.
func (rd *Round) peer(name string) *PeerResult {
	for i := range rd.Peers {
		if rd.Peers[i].Name == name {
			return &rd.Peers[i]
		}
	}
	return nil
}

// Summary is one metric of one peer over the rounds.
type Summary struct {
	// Median is the median of Values, the figure in each round that
	// measured it (Rounds says which).
	Median float64   `json:"median"`
	Values []float64 `json:"values"`
	Rounds []int     `json:"rounds"`
	// Ratios are the figure divided by inproc's in the same round, for
	// each round where both were measured; Ratio is their median, RatioMin
	// and RatioMax their range. All zero for metrics without a ratio.
	Ratio    float64   `json:"ratio,omitempty"`
	RatioMin float64   `json:"ratio_min,omitempty"`
	RatioMax float64   `json:"ratio_max,omitempty"`
	Ratios   []float64 `json:"ratios,omitempty"`
}

// summarize fills r.Summary from r.Rounds.
func (r *Results) summarize() {
	r.Summary = map[string]map[string]Summary{}
	for _, name := range r.peerNames() {
		for _, m := range metrics {
			var s Summary
			for _, rd := range r.Rounds {
				p := rd.peer(name)
				if p == nil {
					continue
				}
				v, ok := m.get(p)
				if !ok {
					continue
				}
				s.Values = append(s.Values, v)
				s.Rounds = append(s.Rounds, rd.Round)
				if base := rd.peer("inproc"); m.ratio && base != nil {
					if b, ok := m.get(base); ok && b != 0 {
						s.Ratios = append(s.Ratios, v/b)
					}
				}
			}
			if len(s.Values) == 0 {
				continue
			}
			s.Median, _, _ = medianRange(s.Values)
			if len(s.Ratios) > 0 {
				s.Ratio, s.RatioMin, s.RatioMax = medianRange(s.Ratios)
			}
			if r.Summary[name] == nil {
				r.Summary[name] = map[string]Summary{}
			}
			r.Summary[name][m.key] = s
		}
	}
}

// pairRatios returns, for each round where both peers have the metric,
// peer a's figure divided by peer b's.
func (r *Results) pairRatios(key, a, b string) ([]float64, bool) {
	m := metricByKey(key)
	var rs []float64
	for _, rd := range r.Rounds {
		pa, pb := rd.peer(a), rd.peer(b)
		if pa == nil || pb == nil {
			continue
		}
		va, ok1 := m.get(pa)
		vb, ok2 := m.get(pb)
		if ok1 && ok2 && vb != 0 {
			rs = append(rs, va/vb)
		}
	}
	return rs, len(rs) > 0
}

// ratioSummary is the Summary of ratios alone.
func ratioSummary(rs []float64) Summary {
	s := Summary{Ratios: rs}
	s.Ratio, s.RatioMin, s.RatioMax = medianRange(rs)
	return s
}

// medianRange returns the median of xs (the mean of the middle two for
// an even count), its minimum and its maximum; zeros for none.
func medianRange(xs []float64) (med, lo, hi float64) {
	if len(xs) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		med = s[n/2]
	} else {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return med, s[0], s[n-1]
}

// peerNames returns the peers in the order they ran.
func (r *Results) peerNames() []string {
	if len(r.Rounds) == 0 {
		return r.Config.Peers
	}
	var names []string
	for _, p := range r.Rounds[0].Peers {
		names = append(names, p.Name)
	}
	return names
}

// notApplicable returns why workload is n/a for peer, or "".
func (r *Results) notApplicable(peer, workload string) string {
	for _, rd := range r.Rounds {
		if p := rd.peer(peer); p != nil {
			return p.NotApplicable[workload]
		}
	}
	return notApplicable[peer][workload]
}
