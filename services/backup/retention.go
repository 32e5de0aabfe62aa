package backup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// Retention is BACKUP_RETENTION: a count of points and of snapshots, or an
// age (Age > 0) within which they are kept. The newest point and snapshot
// are always kept, and a kept point keeps its whole chain (incr.Closure):
// a delta without its base restores nothing.
type Retention struct {
	Count int
	Age   time.Duration
}

func (r Retention) String() string {
	if r.Age > 0 {
		return "younger than " + r.Age.String()
	}
	return fmt.Sprintf("newest %d", r.Count)
}

// keepSnapshots is how many of list (newest first) to keep.
func (r Retention) keepSnapshots(list []Snapshot, now time.Time) int {
	if r.Age <= 0 {
		return max(r.Count, 1)
	}
	n := 0
	for n < len(list) && now.Sub(list[n].CreatedAt) < r.Age {
		n++
	}
	return max(n, 1)
}

// pointsToDelete chooses the points of list (newest first, as ListPoints
// returns them) retention deletes: those neither kept by r (the newest
// always is) nor in the chain of a kept one, nor pinned (the chain a
// capture builds on).
func (r Retention) pointsToDelete(list []PointInfo, now time.Time, pinned []incr.Hash) ([]int64, error) {
	all := make([]incr.Manifest, 0, len(list))
	ids := make(map[incr.Hash]int64, len(list))
	var keep []incr.Hash
	for i, p := range list {
		m, err := p.manifest()
		if err != nil {
			return nil, fmt.Errorf("point %d: %w", p.ID, err)
		}
		all = append(all, m)
		ids[m.ID] = p.ID
		kept := i == 0
		if r.Age > 0 {
			kept = kept || now.Sub(p.CreatedAt) < r.Age
		} else {
			kept = kept || i < max(r.Count, 1)
		}
		if kept {
			keep = append(keep, m.ID)
		}
	}
	for _, h := range pinned {
		if _, ok := ids[h]; ok {
			keep = append(keep, h)
		}
	}
	retained := map[incr.Hash]bool{}
	for _, h := range keep {
		closure, err := incr.Closure(all, []incr.Hash{h})
		if errors.Is(err, incr.ErrBrokenChain) {
			// It cannot be restored anyway; keep it rather than guess.
			retained[h] = true
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, m := range closure {
			retained[m.ID] = true
		}
	}
	var del []int64
	for _, m := range all {
		if !retained[m.ID] {
			del = append(del, ids[m.ID])
		}
	}
	return del, nil
}

// manifest is the part of a point's manifest its row carries: enough for
// incr.Chain and incr.Closure (id, kind, parent, order).
func (p PointInfo) manifest() (incr.Manifest, error) {
	id, err := incr.ParseHash(p.ManifestID)
	if err != nil {
		return incr.Manifest{}, err
	}
	m := incr.Manifest{ID: id, Kind: incr.KindBase, Generation: p.Generation, Seq: uint64(p.Seq), Created: p.CreatedAt}
	if p.Kind == PointDelta {
		m.Kind = incr.KindDelta
		if m.Parent, err = incr.ParseHash(p.Parent); err != nil {
			return incr.Manifest{}, err
		}
	}
	return m, nil
}

// pruneSnapshots applies r to session's full snapshots.
func pruneSnapshots(ctx context.Context, cat Catalog, session string, r Retention, now time.Time) (int64, error) {
	keep := max(r.Count, 1)
	if r.Age > 0 {
		list, err := cat.List(ctx, session, 100000)
		if err != nil {
			return 0, err
		}
		keep = r.keepSnapshots(list, now)
	}
	return cat.Prune(ctx, session, keep)
}

// maxListedPoints bounds one retention pass's listing.
const maxListedPoints = 1_000_000

// Retain applies retention to the session's points and snapshots in st, in
// the pipeline's turn: never while a capture of the session runs, since a
// capture may reuse a piece only the points retention deletes reference.
// The current chain stays whatever r says.
func (p *Incremental) Retain(ctx context.Context, st Store, r Retention) (points, pieces int64, err error) {
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return 0, 0, ctx.Err()
	}
	defer func() { <-p.sem }()
	points, pieces, err = p.retainPoints(ctx, st, r)
	if err != nil {
		return points, pieces, err
	}
	cctx, cancel := clockctx.WithTimeout(ctx, p.cfg.Clock, 2*time.Minute)
	defer cancel()
	if _, err := pruneSnapshots(cctx, st, p.cfg.Session, r, p.cfg.Clock.Now()); err != nil {
		return points, pieces, err
	}
	return points, pieces, nil
}

// retainPoints is Retain's work on points; the caller holds the turn.
func (p *Incremental) retainPoints(ctx context.Context, st Points, r Retention) (points, pieces int64, err error) {
	var pinned []incr.Hash
	if p.where == bus.StoredDatabase {
		for _, m := range p.chain {
			pinned = append(pinned, m.ID)
		}
	}
	clock := p.cfg.Clock
	cctx, cancel := clockctx.WithTimeout(ctx, clock, 2*time.Minute)
	defer cancel()
	list, err := st.ListPoints(cctx, p.cfg.Session, maxListedPoints)
	if err != nil {
		return 0, 0, err
	}
	del, err := r.pointsToDelete(list, clock.Now(), pinned)
	if err != nil {
		return 0, 0, err
	}
	if len(del) > 0 {
		if points, pieces, err = st.DeletePoints(cctx, p.cfg.Session, del); err != nil {
			return 0, 0, err
		}
	}
	if stats, err := st.PointStats(cctx, p.cfg.Session); err == nil {
		p.mu.Lock()
		p.stats.catalog, p.stats.catalogKnown = stats, true
		p.mu.Unlock()
	}
	return points, pieces, nil
}

// retainAfterCompaction runs retention of points as soon as a count
// retention no longer needs the chain before the current one (its newest
// Count points are all in the current chain), rather than at the next
// periodic job: it bounds the storage to about the old chain, the new base
// and Count deltas. The caller holds the turn.
func (p *Incremental) retainAfterCompaction(ctx context.Context, st Points) {
	r := p.cfg.Retention
	if r.Age > 0 || r.Count <= 0 || len(p.chain) != r.Count+1 || p.where != bus.StoredDatabase {
		return
	}
	n, pieces, err := p.retainPoints(ctx, st, r)
	if err != nil {
		p.cfg.Log.Warn("retention after compaction failed; the periodic job tries again", "err", err)
		return
	}
	if n > 0 {
		p.cfg.Log.Info("retention", "deleted_points", n, "deleted_pieces", pieces, "keeps", r.String())
	}
}
