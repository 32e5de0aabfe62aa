package backup

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// Restorer puts a verified snapshot back into the session path.
type Restorer struct {
	Store       Catalog // nil: local fallback only (database unreachable); a Store also restores points
	Session     string
	SessionPath string
	Local       Local
	LocalPoints LocalPoints // the incremental local fallback (zero Dir: none)
	TmpDir      string
	Key         []byte
	Log         *slog.Logger
	// DatabaseOnly leaves the local fallback out: after the lease went to
	// another instance, only the database knows what that instance last used.
	DatabaseOnly bool
	// AllowPlaintext accepts unencrypted snapshots although Key is set
	// (ALLOW_PLAINTEXT_BACKUPS): otherwise whoever can write the database
	// or the fallback directory could slip in a session of their own.
	AllowPlaintext bool
}

// errPlaintext is a plaintext snapshot refused because a key is set.
var errPlaintext = errors.New("snapshot is not encrypted although SESSION_ENCRYPTION_KEY is set (ALLOW_PLAINTEXT_BACKUPS=true accepts it)")

// RestoreResult says what a restore did.
type RestoreResult struct {
	Restored   bool
	Source     string // bus.SourceDatabase, SourceLocal, SourceNone, SourceExisting
	SnapshotID int64  // database id, when from the database
	SHA256     string
	// Point is the incremental point restored (nil: a full snapshot, or
	// nothing): its catalog id (0: the local fallback's), manifest and age.
	Point *RestoredPoint
}

// RestoredPoint is the incremental point a restore wrote.
type RestoredPoint struct {
	ID         int64
	ManifestID string
	Kind       string
	Generation int64
	Seq        uint64
	CreatedAt  time.Time
	Age        time.Duration
	Skipped    int // newer points that did not verify
}

// ErrKey is a restore refused because of SESSION_ENCRYPTION_KEY.
var ErrKey = errors.New("restore refused: check SESSION_ENCRYPTION_KEY")

// DBError is a database failure during restore (connection reset, timeout):
// it says nothing about the snapshots, so restore stops rather than fall back
// to an older snapshot, which would break decryption (guarantee 2).
type DBError struct{ Err error }

func (e *DBError) Error() string { return "database: " + e.Err.Error() }
func (e *DBError) Unwrap() error { return e.Err }

// IsDBError reports whether err is a database failure during restore.
func IsDBError(err error) bool {
	var d *DBError
	return errors.As(err, &d)
}

// candidate is a snapshot to try, from the database or the fallback.
type candidate struct {
	at     time.Time
	id     int64 // database
	path   string
	source string
	sha    string
}

func (c candidate) String() string {
	if c.source == bus.SourceDatabase {
		return fmt.Sprintf("database snapshot %d", c.id)
	}
	return "local snapshot " + c.path
}

// candidates lists the database's snapshots and the fallback's, newest
// first: after an outage the local one may be newer than the database's, and
// restoring an older store than the last used breaks Signal sessions.
func (r *Restorer) candidates(ctx context.Context) ([]candidate, error) {
	var list []Snapshot
	if r.Store != nil {
		var err error
		if list, err = r.Store.List(ctx, r.Session, 1000); err != nil {
			return nil, &DBError{Err: err}
		}
		// Insert order (id), never a clock: created_at comes from whichever
		// instance wrote the row, and clocks differ.
		slices.SortStableFunc(list, func(a, b Snapshot) int { return cmp.Compare(b.ID, a.ID) })
	}
	var files []LocalFile
	if !r.DatabaseOnly {
		var err error
		if files, err = r.Local.List(); err != nil {
			r.Log.Warn("local fallback unreadable", "err", err)
		}
	}
	// A local file holding the same store as a database row is tried right
	// after that row (which has an id to report), as its spare copy. The
	// others are merged in by time: after an outage the local one may be
	// newer than the database's.
	spares := map[string][]LocalFile{}
	inDB := map[string]bool{}
	for _, sn := range list {
		inDB[sn.SHA256] = true
	}
	var loose []LocalFile // newest first
	for _, f := range files {
		if inDB[f.SHA256] {
			spares[f.SHA256] = append(spares[f.SHA256], f)
		} else {
			loose = append(loose, f)
		}
	}
	local := func(f LocalFile) candidate {
		return candidate{at: f.CreatedAt, path: f.Path, source: bus.SourceLocal, sha: f.SHA256}
	}
	var out []candidate
	for _, sn := range list {
		// At equal times the database copy first.
		for len(loose) > 0 && loose[0].CreatedAt.After(sn.CreatedAt) {
			out = append(out, local(loose[0]))
			loose = loose[1:]
		}
		out = append(out, candidate{at: sn.CreatedAt, id: sn.ID, source: bus.SourceDatabase, sha: sn.SHA256})
		for _, f := range spares[sn.SHA256] {
			out = append(out, local(f))
		}
		delete(spares, sn.SHA256)
	}
	for _, f := range loose {
		out = append(out, local(f))
	}
	return out, nil
}

// NeedsRestore reports whether the session store must be restored: it is
// missing, fails integrity_check, or has no device while a snapshot exists.
func (r *Restorer) NeedsRestore(ctx context.Context) (bool, string, error) {
	if _, err := os.Stat(r.SessionPath); errors.Is(err, fs.ErrNotExist) {
		return true, "session store missing", nil
	} else if err != nil {
		return false, "", fmt.Errorf("session store: %w", err)
	}
	if err := snapshot.Check(ctx, r.SessionPath); err != nil {
		if ctx.Err() != nil {
			return false, "", ctx.Err() // stopping, not a damaged store
		}
		return true, "session store fails integrity_check", nil
	}
	has, err := snapshot.HasDevice(ctx, r.SessionPath)
	if err != nil {
		if ctx.Err() != nil {
			return false, "", ctx.Err()
		}
		return true, "session store unreadable", nil
	}
	if has {
		return false, "", nil
	}
	cands, err := r.candidates(ctx)
	if err != nil {
		return false, "", err
	}
	points, err := r.pointSet(ctx)
	if err != nil {
		return false, "", err
	}
	if len(cands) > 0 || len(points.sealed) > 0 {
		return true, "session store has no linked device but a snapshot exists", nil
	}
	return false, "", nil
}

// RestoreOnStart restores when NeedsRestore says so.
func (r *Restorer) RestoreOnStart(ctx context.Context) (RestoreResult, error) {
	need, why, err := r.NeedsRestore(ctx)
	if err != nil {
		return RestoreResult{}, err
	}
	if !need {
		return RestoreResult{Source: bus.SourceExisting}, nil
	}
	r.Log.Info("restoring session store", "why", why)
	res, err := r.Restore(ctx, 0)
	if err == nil && ctx.Err() != nil {
		// Stopping: candidates may have failed to verify only because of
		// that. Never move a store aside on a cancelled check.
		return RestoreResult{}, ctx.Err()
	}
	if err == nil && !res.Restored {
		// Nothing to restore. A damaged store cannot be opened anyway: keep
		// it aside for inspection so the gateway can start and pair afresh.
		if _, serr := os.Stat(r.SessionPath); serr == nil && snapshot.Check(ctx, r.SessionPath) != nil {
			aside := r.SessionPath + ".corrupt"
			if err := os.Rename(r.SessionPath, aside); err != nil {
				return res, fmt.Errorf("move damaged session store aside: %w", err)
			}
			_ = os.Chmod(aside, 0o600) // an older version made the store 0644
			for _, side := range []string{"-wal", "-shm", "-journal"} {
				_ = os.Remove(r.SessionPath + side)
			}
			r.Log.Warn("damaged session store moved aside; nothing to restore it from", "path", aside)
		}
	}
	return res, err
}

// Restore writes the newest snapshot or point that verifies (or snapshot
// id, when not zero) into the session path. Damaged ones are skipped with a
// warning; a key problem stops everything and nothing is written.
func (r *Restorer) Restore(ctx context.Context, id int64) (RestoreResult, error) {
	return r.RestoreTarget(ctx, Target{SnapshotID: id})
}

// Target chooses what RestoreTarget restores; the zero Target is the
// newest that verifies.
type Target struct {
	SnapshotID int64     // this full snapshot only
	PointID    int64     // this point only
	At         time.Time // the newest at or before this time
}

// RestoreTarget writes the snapshot or point t chooses into the session
// path. Points and full snapshots are merged by time: full snapshots newer
// than the newest point (a release without continuous replication ran
// since) come first, then the points (newest verifiable first, highest
// generation first: incr.Restore), then the older full snapshots.
func (r *Restorer) RestoreTarget(ctx context.Context, t Target) (RestoreResult, error) {
	cands, err := r.candidates(ctx)
	if err != nil {
		return RestoreResult{}, fmt.Errorf("list snapshots: %w", err)
	}
	var points pointSet
	if t.SnapshotID == 0 {
		if points, err = r.pointSet(ctx); err != nil {
			return RestoreResult{}, fmt.Errorf("list points: %w", err)
		}
	}
	switch {
	case t.SnapshotID != 0:
		cands = slices.DeleteFunc(cands, func(c candidate) bool { return c.source != bus.SourceDatabase || c.id != t.SnapshotID })
		if len(cands) == 0 {
			return RestoreResult{}, fmt.Errorf("snapshot %d: %w", t.SnapshotID, ErrNotFound)
		}
	case t.PointID != 0:
		cands = nil
		if points.accept = points.only(t.PointID); points.accept == nil {
			return RestoreResult{}, fmt.Errorf("point %d: %w", t.PointID, ErrNotFound)
		}
	case !t.At.IsZero():
		_, anyPoint := points.newest(r.Key)
		stored := len(cands) > 0 || anyPoint
		cands = slices.DeleteFunc(cands, func(c candidate) bool { return c.at.After(t.At) })
		points.accept = func(m incr.Manifest) bool { return !m.Created.After(t.At) }
		if _, ok := points.newest(r.Key); stored && !ok && len(cands) == 0 {
			// Not "nothing verifies": everything stored is newer.
			return RestoreResult{}, fmt.Errorf("nothing stored at or before %s: %w", t.At.UTC().Format(time.RFC3339), ErrNotFound)
		}
	}
	newestPoint, hasPoints := points.newest(r.Key)
	tried := 0
	pointsTried := !hasPoints
	for i := 0; i <= len(cands); i++ {
		if !pointsTried && (i == len(cands) || !cands[i].at.After(newestPoint)) {
			pointsTried = true
			res, ok, err := r.restorePoints(ctx, points)
			if err != nil || ok {
				return res, err
			}
		}
		if i == len(cands) {
			break
		}
		c := cands[i]
		tried++
		plain, err := r.load(ctx, c)
		if err != nil {
			if isKeyErr(err) {
				return RestoreResult{}, fmt.Errorf("%s: %w (%w)", c, ErrKey, err)
			}
			if IsDBError(err) {
				// Not a bad snapshot: the database failed. An older one
				// would be a stale store; nothing is written.
				return RestoreResult{}, fmt.Errorf("%s: %w", c, err)
			}
			r.Log.Warn("skipping snapshot that does not verify", "snapshot", c.String(), "err", err)
			continue
		}
		if err := r.write(plain); err != nil {
			return RestoreResult{}, err
		}
		r.Log.Info("session store restored", "snapshot", c.String(), "bytes", len(plain), "age", time.Since(c.at).Round(time.Second))
		return RestoreResult{Restored: true, Source: c.source, SnapshotID: c.id, SHA256: c.sha}, nil
	}
	switch {
	case t.SnapshotID != 0:
		return RestoreResult{}, fmt.Errorf("snapshot %d does not verify; nothing written", t.SnapshotID)
	case t.PointID != 0:
		return RestoreResult{}, fmt.Errorf("point %d does not verify; nothing written", t.PointID)
	}
	r.Log.Warn("no snapshot to restore from", "tried", tried, "points", len(points.sealed))
	return RestoreResult{Source: bus.SourceNone}, nil
}

func isKeyErr(err error) bool {
	return errors.Is(err, snapshot.ErrWrongKey) || errors.Is(err, snapshot.ErrNeedKey) || errors.Is(err, snapshot.ErrBadKey)
}

// load fetches, decodes and verifies one candidate.
func (r *Restorer) load(ctx context.Context, c candidate) ([]byte, error) {
	var payload []byte
	var err error
	if c.source == bus.SourceDatabase {
		payload, err = r.Store.Payload(ctx, c.id)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, &DBError{Err: err}
		}
	} else {
		payload, err = os.ReadFile(c.path)
	}
	if err != nil {
		return nil, err
	}
	// The header says whether the payload is encrypted: a plaintext one is
	// refused before anything is decompressed, so a planted file costs
	// nothing at every start.
	if meta, err := snapshot.PeekMeta(payload); err == nil && len(r.Key) > 0 && !meta.Encrypted && !r.AllowPlaintext {
		return nil, errPlaintext
	}
	plain, _, err := snapshot.Decode(payload, r.Key)
	if err != nil {
		return nil, err
	}
	has, err := snapshot.Verify(ctx, plain, r.TmpDir)
	if err != nil {
		return nil, err
	}
	if !has {
		return nil, errors.New("snapshot holds no linked device")
	}
	return plain, nil
}

// write replaces the session store. The old file is kept aside as
// session.db.replaced, and its WAL files are removed: SQLite would otherwise
// replay the old WAL into the restored database.
func (r *Restorer) write(plain []byte) error {
	if err := os.MkdirAll(filepath.Dir(r.SessionPath), 0o700); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	if _, err := os.Stat(r.SessionPath); err == nil {
		if err := os.Rename(r.SessionPath, r.SessionPath+".replaced"); err != nil {
			return fmt.Errorf("restore: keep old store: %w", err)
		}
		_ = os.Chmod(r.SessionPath+".replaced", 0o600) // an older version made the store 0644
	}
	for _, side := range []string{"-wal", "-shm", "-journal"} {
		if err := os.Remove(r.SessionPath + side); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("restore: %w", err)
		}
	}
	if err := snapshot.WriteFileAtomic(r.SessionPath, plain, 0o600); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	return nil
}
