package incr

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"
)

// ErrBrokenChain means a point's chain lacks a manifest (deleted, or unreadable) or loops.
var ErrBrokenChain = errors.New("incr: broken chain")

// Newest orders points as restore tries them: highest generation first, then highest sequence, then newest. A
// point of a lower generation is only tried when no point of a higher one verifies: a new lease holder's points
// supersede whatever an older holder wrote, however recent.
func Newest(points []Manifest) []Manifest {
	out := slices.Clone(points)
	slices.SortStableFunc(out, func(a, b Manifest) int {
		return cmp.Or(cmp.Compare(b.Generation, a.Generation), cmp.Compare(b.Seq, a.Seq), b.Created.Compare(a.Created))
	})
	return out
}

// Chain returns the points that make target, base first: target's parents followed back to a base. A parent may
// belong to an older generation (the first delta of a new lease holder continues the point it restored).
func Chain(points []Manifest, target Hash) ([]Manifest, error) {
	byID := make(map[Hash]Manifest, len(points))
	for _, m := range points {
		byID[m.ID] = m
	}
	var chain []Manifest
	for id := target; ; {
		m, ok := byID[id]
		if !ok {
			return nil, fmt.Errorf("%w: point %s is missing from the chain of %s", ErrBrokenChain, id, target)
		}
		chain = append(chain, m)
		if m.Kind == KindBase {
			break
		}
		if len(chain) > len(points) {
			return nil, fmt.Errorf("%w: the chain of %s loops", ErrBrokenChain, target)
		}
		id = m.Parent
	}
	slices.Reverse(chain)
	return chain, nil
}

// Policy decides when a new base is due. Zero fields take their defaults.
type Policy struct {
	// DeltaShare: a base is due once the deltas since the last base carry more than this share of its pages
	// (default 0.5). It bounds both the storage of a chain (at most 1.5 times a base) and its restore (which reads at
	// most that much).
	DeltaShare float64
	// MaxAge: a base is due once the last one is this old (default 24h), so a chain never spans more than a day
	// of retention.
	MaxAge time.Duration
	// MaxDeltas: a base is due after this many deltas (default 5000), bounding the manifests restore reads.
	MaxDeltas int
}

// BaseDue tells whether the chain (base first, as Chain returns it) should be followed by a new base, and why.
func (p Policy) BaseDue(chain []Manifest, now time.Time) (bool, string) {
	if len(chain) == 0 {
		return true, "no base"
	}
	share := cmp.Or(p.DeltaShare, 0.5)
	age := cmp.Or(p.MaxAge, 24*time.Hour)
	maxDeltas := cmp.Or(p.MaxDeltas, 5000)
	base := chain[0]
	var deltas int64
	for _, m := range chain[1:] {
		deltas += m.PlainBytes()
	}
	switch {
	case float64(deltas) > share*float64(base.PlainBytes()):
		return true, fmt.Sprintf("deltas carry %d bytes, over %.0f%% of the base's %d", deltas, share*100, base.PlainBytes())
	case now.Sub(base.Created) >= age:
		return true, fmt.Sprintf("the base is %s old", now.Sub(base.Created).Round(time.Second))
	case len(chain)-1 >= maxDeltas:
		return true, fmt.Sprintf("%d deltas since the base", len(chain)-1)
	}
	return false, ""
}

// Closure returns the points that keeping the points keep requires: each of them and its chain down to its base.
// Retention decides what to keep; this is what it may not delete.
func Closure(points []Manifest, keep []Hash) ([]Manifest, error) {
	seen := make(map[Hash]bool)
	var out []Manifest
	for _, id := range keep {
		chain, err := Chain(points, id)
		if err != nil {
			return nil, err
		}
		for _, m := range chain {
			if !seen[m.ID] {
				seen[m.ID] = true
				out = append(out, m)
			}
		}
	}
	return out, nil
}

// Unreferenced lists the held pieces no retained point references: what garbage collection may delete. retained
// must be closed under Closure. A piece written by a capture whose point was never recorded is unreferenced too;
// the caller must not run this concurrently with a capture of the same session (the lease and the unique job
// serialise them).
func Unreferenced(held []Hash, retained []Manifest) []Hash {
	ref := make(map[Hash]bool)
	for _, m := range retained {
		for _, p := range m.Pieces {
			ref[p.ID] = true
		}
	}
	var out []Hash
	for _, id := range held {
		if !ref[id] {
			out = append(out, id)
		}
	}
	return out
}
