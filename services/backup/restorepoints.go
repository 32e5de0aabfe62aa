package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// pointSet is every incremental point a restore may use: the catalog's
// and (unless DatabaseOnly) the local fallback's, one incr.Restore over
// both, so generations and sequence numbers order them whichever store
// holds them.
type pointSet struct {
	sealed [][]byte
	dbID   map[incr.Hash]int64 // manifest id -> catalog id
	pieces layeredPieces
	accept func(incr.Manifest) bool
}

// pointSet reads the sealed manifests.
func (r *Restorer) pointSet(ctx context.Context) (pointSet, error) {
	ps := pointSet{dbID: map[incr.Hash]int64{}}
	if !r.DatabaseOnly && r.LocalPoints.Dir != "" {
		if sealed, err := r.LocalPoints.Manifests(); err != nil {
			r.Log.Warn("local fallback of points unreadable", "err", err)
		} else if len(sealed) > 0 {
			ps.sealed = append(ps.sealed, sealed...)
			if local, err := r.LocalPoints.Pieces(); err == nil {
				ps.pieces = append(ps.pieces, local)
			}
		}
	}
	if pts, ok := r.Store.(Points); ok && r.Store != nil {
		list, err := pts.Manifests(ctx, r.Session)
		if err != nil {
			return ps, &DBError{Err: err}
		}
		for _, m := range list {
			if id, err := incr.PeekID(m.Sealed); err == nil {
				ps.dbID[id] = m.ID
			}
			ps.sealed = append(ps.sealed, m.Sealed)
		}
		ps.pieces = append(ps.pieces, catalogPieces{cat: pts, session: r.Session})
	}
	return ps, nil
}

// only accepts the catalog's point id alone (nil: no such point).
func (ps pointSet) only(id int64) func(incr.Manifest) bool {
	for h, dbID := range ps.dbID {
		if dbID == id {
			return func(m incr.Manifest) bool { return m.ID == h }
		}
	}
	return nil
}

// newest is the creation time of the newest point restore may pick.
func (ps pointSet) newest(key []byte) (time.Time, bool) {
	var at time.Time
	found := false
	for _, s := range ps.sealed {
		m, err := incr.OpenManifest(s, key)
		if err != nil || (ps.accept != nil && !ps.accept(m)) {
			continue
		}
		if !found || m.Created.After(at) {
			at, found = m.Created, true
		}
	}
	return at, found
}

// restoreAttempts bounds how often restorePoints reads the points again
// when pieces went missing under it: retention deleted the chain it was
// assembling (points newer than those it listed exist by then).
const restoreAttempts = 3

// restorePoints restores the newest point of ps that verifies: ok false
// when none does (the caller tries older full snapshots).
func (r *Restorer) restorePoints(ctx context.Context, ps pointSet) (RestoreResult, bool, error) {
	for attempt := 1; ; attempt++ {
		res, ok, vanished, err := r.restorePointsOnce(ctx, ps)
		if ok || err != nil || !vanished || attempt == restoreAttempts {
			return res, ok, err
		}
		accept := ps.accept
		if ps, err = r.pointSet(ctx); err != nil {
			return RestoreResult{}, false, err
		}
		ps.accept = accept
		r.Log.Info("points were deleted while restoring (retention); reading them again")
	}
}

// restorePointsOnce is one pass of restorePoints; vanished says a point
// failed only for lack of a piece or manifest.
func (r *Restorer) restorePointsOnce(ctx context.Context, ps pointSet) (_ RestoreResult, ok, vanished bool, _ error) {
	res, err := incr.Restore(ctx, r.SessionPath, ps.sealed, incr.RestoreOptions{Key: r.Key, Pieces: ps.pieces,
		Check: r.checkRestored, Accept: ps.accept, Log: r.Log})
	for _, sk := range res.Skipped {
		r.Log.Warn("skipping point that does not verify", "point", sk.ID.String()[:12], "generation", sk.Generation,
			"seq", sk.Seq, "err", sk.Reason)
	}
	switch {
	case errors.Is(err, incr.ErrNoPoint):
		for _, sk := range res.Skipped {
			if errors.Is(sk.Reason, incr.ErrNoPiece) || errors.Is(sk.Reason, incr.ErrBrokenChain) {
				vanished = true
			}
		}
		return RestoreResult{}, false, vanished, nil
	case isKeyErr(err) || errors.Is(err, incr.ErrWrongKey) || errors.Is(err, incr.ErrNeedKey) || errors.Is(err, incr.ErrPlaintext):
		return RestoreResult{}, false, false, fmt.Errorf("points: %w (%w)", ErrKey, err)
	case err != nil:
		if IsDBError(err) {
			return RestoreResult{}, false, false, err
		}
		return RestoreResult{}, false, false, fmt.Errorf("restore points: %w", err)
	}
	m := res.Point
	source := bus.SourceLocal
	id, inDB := ps.dbID[m.ID]
	if inDB {
		source = bus.SourceDatabase
	}
	rp := &RestoredPoint{ID: id, ManifestID: m.ID.String(), Kind: m.Kind.String(), Generation: m.Generation, Seq: m.Seq,
		CreatedAt: m.Created, Age: res.Age, Skipped: len(res.Skipped)}
	r.Log.Info("session store restored from a point", "point", id, "kind", rp.Kind, "generation", m.Generation,
		"seq", m.Seq, "age", res.Age.Round(time.Millisecond), "chain", res.Chain, "skipped_newer", len(res.Skipped), "source", source)
	return RestoreResult{Restored: true, Source: source, SnapshotID: id, SHA256: m.DBHash.String(), Point: rp}, true, false, nil
}

// checkRestored is restore's last check of an assembled point: a linked
// device, as for a full snapshot. It then keeps the store about to be
// replaced as session.db.replaced (a hard link: the session path itself
// stays until the restored file is renamed over it).
func (r *Restorer) checkRestored(ctx context.Context, path string) error {
	has, err := snapshot.HasDevice(ctx, path)
	if err != nil {
		return err
	}
	if !has {
		return errors.New("point holds no linked device")
	}
	aside := r.SessionPath + ".replaced"
	if _, err := os.Stat(r.SessionPath); err == nil {
		_ = os.Remove(aside)
		if err := os.Link(r.SessionPath, aside); err != nil {
			return fmt.Errorf("restore: keep old store: %w", err)
		}
		_ = os.Chmod(aside, 0o600)
	}
	return nil
}
