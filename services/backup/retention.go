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

// StorageBound is how many times the store's size the points of a session
// may occupy in the database: retention deletes the oldest whole chains
// beyond it, whatever BACKUP_RETENTION keeps, the newest chain excepted.
// Why a bound on top of the count or age: under churn the 50% rule takes a
// new base every few points, so 48 points can be a dozen bases (measured:
// 33 times the store with no bound). The newest chain alone is at most
// about 1.5 times the store (Policy.DeltaShare), compressed, so the bound is
// always reachable.
const StorageBound = 3

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
	for {
		if len(del) > 0 {
			n, pc, err := st.DeletePoints(cctx, p.cfg.Session, del)
			if err != nil {
				return points, pieces, err
			}
			points, pieces = points+n, pieces+pc
			list = without(list, del)
		}
		stats, err := st.PointStats(cctx, p.cfg.Session)
		if err != nil {
			return points, pieces, err
		}
		p.mu.Lock()
		p.stats.catalog, p.stats.catalogKnown = stats, true
		p.mu.Unlock()
		if len(list) == 0 || stats.StoredBytes() <= StorageBound*list[0].SizeBytes {
			break
		}
		if del, err = oldestChain(list, pinned); err != nil || len(del) == 0 {
			break // only the newest chain (or unreadable ones) left
		}
	}
	p.planRetention(list, r, clock.Now())
	return points, pieces, nil
}

// without is list less the points ids names.
func without(list []PointInfo, ids []int64) []PointInfo {
	gone := make(map[int64]bool, len(ids))
	for _, id := range ids {
		gone[id] = true
	}
	out := list[:0:0]
	for _, pi := range list {
		if !gone[pi.ID] {
			out = append(out, pi)
		}
	}
	return out
}

// oldestChain is the points of list (newest first) built on its oldest
// base, unless that base is in the chain of the newest point or of pinned:
// a whole chain, what the storage bound deletes first.
func oldestChain(list []PointInfo, pinned []incr.Hash) ([]int64, error) {
	all := make([]incr.Manifest, len(list))
	for i, pi := range list {
		m, err := pi.manifest()
		if err != nil {
			return nil, fmt.Errorf("point %d: %w", pi.ID, err)
		}
		all[i] = m
	}
	protected := map[incr.Hash]bool{}
	for _, h := range append([]incr.Hash{all[0].ID}, pinned...) {
		chain, err := incr.Chain(all, h)
		if err == nil {
			protected[chain[0].ID] = true
		}
	}
	var oldest incr.Hash
	found := false
	for i := len(all) - 1; i >= 0 && !found; i-- {
		if all[i].Kind == incr.KindBase && !protected[all[i].ID] {
			oldest, found = all[i].ID, true
		}
	}
	if !found {
		return nil, nil
	}
	var del []int64
	for i, m := range all {
		if chain, err := incr.Chain(all, m.ID); err == nil && chain[0].ID == oldest {
			del = append(del, list[i].ID)
		}
	}
	return del, nil
}

// planRetention notes, from what retention left (newest first), when the
// next pass can delete something without a new base: once the newest point
// outside the newest chain falls out of what r keeps (after so many more
// points, or at a time).
func (p *Incremental) planRetention(left []PointInfo, r Retention, now time.Time) {
	p.retainAfter, p.retainAt, p.sinceRetain = 0, time.Time{}, 0
	if len(left) == 0 {
		return
	}
	all := make([]incr.Manifest, 0, len(left))
	for _, pi := range left {
		m, err := pi.manifest()
		if err != nil {
			return
		}
		all = append(all, m)
	}
	chain, err := incr.Chain(all, all[0].ID)
	if err != nil {
		return
	}
	in := map[incr.Hash]bool{}
	for _, m := range chain {
		in[m.ID] = true
	}
	for i, m := range all {
		if in[m.ID] {
			continue
		}
		if r.Age > 0 {
			p.retainAt = left[i].CreatedAt.Add(r.Age)
		} else {
			p.retainAfter = max(max(r.Count, 1)-i, 1)
		}
		return
	}
}

// retainIfDue runs retention of points right after a point is recorded in
// the database, rather than at the next periodic job (which a process
// restarted often may never run), when it may delete something: after
// every new base (an older chain may no longer be needed, or the storage
// bound passed), once the newest point outside the current chain falls out
// of what BACKUP_RETENTION keeps (planRetention), or when the points stored
// pass StorageBound. The caller holds the turn.
func (p *Incremental) retainIfDue(ctx context.Context, st Points, base bool) {
	r := p.cfg.Retention
	if (r.Count <= 0 && r.Age <= 0) || p.where != bus.StoredDatabase {
		return
	}
	p.sinceRetain++
	due := base ||
		(p.retainAfter > 0 && p.sinceRetain >= p.retainAfter) ||
		(!p.retainAt.IsZero() && !p.cfg.Clock.Now().Before(p.retainAt))
	if !due && len(p.chain) > 0 {
		m := p.chain[len(p.chain)-1]
		p.mu.Lock()
		c := p.stats.catalog
		due = p.stats.catalogKnown && c.Points > int64(len(p.chain)) &&
			c.StoredBytes() > StorageBound*int64(m.PageSize)*int64(m.PageCount)
		p.mu.Unlock()
	}
	if !due {
		return
	}
	n, pieces, err := p.retainPoints(ctx, st, r)
	if err != nil {
		p.cfg.Log.Warn("retention after a point failed; the periodic job tries again", "err", err)
		return
	}
	if n > 0 {
		// Debug: under churn this runs after every base; the minute's
		// summary says what is stored.
		p.cfg.Log.Debug("retention", "deleted_points", n, "deleted_pieces", pieces, "keeps", r.String())
	}
}
