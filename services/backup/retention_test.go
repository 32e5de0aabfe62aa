package backup_test

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// fakeLease is a held lease of a fixed generation.
type fakeLease int64

func (fakeLease) Held() bool          { return true }
func (l fakeLease) Generation() int64 { return int64(l) }
func (fakeLease) String() string      { return "held" }

var _ interface{ Generation() int64 } = fakeLease(0)

type incrRig struct {
	t     testing.TB
	pipe  *backup.Incremental
	st    backup.Store
	path  string
	clock *clockwork.FakeClock
}

// newIncrRig is an Incremental pipeline on a real store and database,
// holding the lease as "me"; policy decides its bases.
func newIncrRig(t testing.TB, kind string, policy incr.Policy) *incrRig {
	return newIncrRigSized(t, kind, policy, 256<<10, clockwork.NewFakeClockAt(time.Now()))
}

func newIncrRigSized(t testing.TB, kind string, policy incr.Policy, size int64, clock clockwork.Clock) *incrRig {
	return newIncrRigRetaining(t, kind, policy, size, clock, backup.Retention{})
}

// newIncrRigRetaining is newIncrRigSized whose pipeline also retains after
// compaction by r.
func newIncrRigRetaining(t testing.TB, kind string, policy incr.Policy, size int64, clock clockwork.Clock, keep backup.Retention) *incrRig {
	t.Helper()
	return newIncrRigLogging(t, kind, policy, size, clock, keep, discard())
}

// newIncrRigLogging is newIncrRigRetaining whose pipeline logs to log.
func newIncrRigLogging(t testing.TB, kind string, policy incr.Policy, size int64, clock clockwork.Clock, keep backup.Retention, log *slog.Logger) *incrRig {
	t.Helper()
	dir := t.TempDir()
	st := newDatabase(t, kind).mustOpen(t)
	lease, ok, err := st.AcquireLease(context.Background(), session, "me", time.Now(), 24*365*time.Hour, backup.Lease{})
	if err != nil || !ok {
		t.Fatalf("lease: %v %v", ok, err)
	}
	r := &incrRig{t: t, st: st, path: newStore(t, dir, size)}
	r.clock, _ = clock.(*clockwork.FakeClock)
	write(t, r.path, 1)
	r.pipe = backup.NewIncremental(backup.IncrementalConfig{Session: session, Holder: "me", SessionPath: r.path,
		Local: backup.LocalPoints{Dir: filepath.Join(dir, "backups", "incr")}, Policy: policy, Retention: keep, Clock: clock, Log: log,
		Lease: fakeLease(lease.Generation)})
	t.Cleanup(func() { _ = r.pipe.Close() })
	return r
}

// point commits n writes and takes a point.
func (r *incrRig) point(n int, reason string) backup.Outcome {
	r.t.Helper()
	if n > 0 {
		write(r.t, r.path, n)
	}
	o, err := r.pipe.Point(context.Background(), backup.Run{Job: backup.JobInfo{Reason: reason}, Catalog: r.st})
	if err != nil || o.Where != bus.StoredDatabase {
		r.t.Fatalf("point: %+v, %v", o, err)
	}
	return o
}

func kinds2(list []backup.PointInfo) string {
	s := ""
	for i := len(list) - 1; i >= 0; i-- {
		s += list[i].Kind[:1]
	}
	return s
}

// noUnreferencedPieces: every piece left is referenced by a point.
func noUnreferencedPieces(t testing.TB, st backup.Store) {
	t.Helper()
	if _, pieces, err := st.DeletePoints(context.Background(), session, nil); err != nil || pieces != 0 {
		t.Fatalf("retention left %d unreferenced pieces (%v)", pieces, err)
	}
}

// Retention by count keeps the newest points with their whole chains and
// deletes every piece only deleted points referenced; the newest still
// restores.
func TestRetentionByCountKeepsChainsAndCollectsPieces(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			r := newIncrRig(t, kind, incr.Policy{MaxDeltas: 3})
			for range 10 {
				r.point(3, backup.ReasonSync)
			}
			list := points(t, r.st)
			if got := kinds2(list); got != "bdddbdddbd" {
				t.Fatalf("points %s; want a base every four", got)
			}
			before, _ := r.st.PointStats(context.Background(), session)
			ctx := context.Background()
			// Five: the newest five need the base before them.
			n, pieces, err := r.pipe.Retain(ctx, r.st, backup.Retention{Count: 5})
			if err != nil || n != 4 || pieces == 0 {
				t.Fatalf("retain 5 = %d points, %d pieces, %v; want 4 points and their pieces", n, pieces, err)
			}
			if got := kinds2(points(t, r.st)); got != "bdddbd" {
				t.Fatalf("left %s; want the two newest chains", got)
			}
			noUnreferencedPieces(t, r.st)
			// One: the newest and its base.
			if _, _, err := r.pipe.Retain(ctx, r.st, backup.Retention{Count: 1}); err != nil {
				t.Fatal(err)
			}
			left := points(t, r.st)
			if got := kinds2(left); got != "bd" || left[0].ID != list[0].ID {
				t.Fatalf("left %s; want the newest delta and its base", got)
			}
			noUnreferencedPieces(t, r.st)
			after, _ := r.st.PointStats(ctx, session)
			if after.StoredBytes() >= before.StoredBytes() {
				t.Fatalf("stored %d bytes after retention, %d before", after.StoredBytes(), before.StoredBytes())
			}
			restoreNewest(t, r.st, nil)
		})
	}
}

// Retention by age keeps the points younger than it (and their chains).
func TestRetentionByAgeKeepsYoungerPoints(t *testing.T) {
	r := newIncrRig(t, "sqlite", incr.Policy{MaxDeltas: 2})
	for range 9 {
		r.point(2, backup.ReasonSync)
		r.clock.Advance(time.Hour)
	}
	if got := kinds2(points(t, r.st)); got != "bddbddbdd" {
		t.Fatalf("points %s", got)
	}
	// The last point is an hour old now: 2h30m keeps the newest two, which
	// need their base.
	if _, _, err := r.pipe.Retain(context.Background(), r.st, backup.Retention{Age: 150 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if got := kinds2(points(t, r.st)); got != "bdd" {
		t.Fatalf("left %s; want the newest chain", got)
	}
	noUnreferencedPieces(t, r.st)
	// Everything older than the age: the newest and its chain stay.
	r.clock.Advance(48 * time.Hour)
	if _, _, err := r.pipe.Retain(context.Background(), r.st, backup.Retention{Age: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if got := kinds2(points(t, r.st)); got != "bdd" {
		t.Fatalf("left %s; the newest point and its chain must stay", got)
	}
}

// Compaction (a base every other point) and retention race restores: every
// restore restores a committed prefix, never fails, never an empty store.
func TestCompactionAndRetentionRaceRestores(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			r := newIncrRig(t, kind, incr.Policy{MaxDeltas: 1})
			r.point(1, backup.ReasonSync)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var restores int
			var failed error
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					dir := t.TempDir()
					rs := &backup.Restorer{Store: r.st, Session: session, SessionPath: dir + "/session.db", TmpDir: dir, Log: discard()}
					res, err := rs.RestoreTarget(context.Background(), backup.Target{})
					if err == nil && !res.Restored {
						err = errNothingRestored
					}
					if err == nil {
						var count, maxN int64
						count, maxN, err = wastore.Writes(context.Background(), rs.SessionPath)
						if err == nil && count != maxN {
							err = errNotPrefix
						}
					}
					if err != nil {
						failed = err
						return
					}
					restores++
				}
			})
			for range 20 {
				r.point(2, backup.ReasonSync)
				if _, _, err := r.pipe.Retain(context.Background(), r.st, backup.Retention{Count: 2}); err != nil {
					t.Fatal(err)
				}
			}
			close(stop)
			wg.Wait()
			if failed != nil {
				t.Fatalf("a restore racing compaction and retention failed: %v", failed)
			}
			if restores == 0 {
				t.Fatal("no restore ran during the race")
			}
			t.Logf("%d restores during 20 points with compaction and retention", restores)
		})
	}
}

type testErr string

func (e testErr) Error() string { return string(e) }

const (
	errNothingRestored = testErr("nothing restored")
	errNotPrefix       = testErr("restored writes are not a committed prefix")
)

// The compaction job takes a base only when one is due, even without a
// change (old chains can then be retired); otherwise it captures nothing.
func TestCompactionJobTakesABaseWhenDue(t *testing.T) {
	r := newIncrRig(t, "sqlite", incr.Policy{MaxAge: time.Hour})
	r.point(0, backup.ReasonSync)
	r.point(2, backup.ReasonSync)
	r.point(0, backup.ReasonCompaction)
	if got := kinds2(points(t, r.st)); got != "bd" {
		t.Fatalf("points %s; a compaction that is not due took one", got)
	}
	r.clock.Advance(2 * time.Hour)
	r.point(0, backup.ReasonCompaction)
	list := points(t, r.st)
	if got := kinds2(list); got != "bdb" || list[0].Reason != backup.ReasonCompaction {
		t.Fatalf("points %s (newest %+v); want a compaction base", got, list[0])
	}
}

// With retention by count, the chain before the current one is deleted as
// soon as the newest points no longer need it, without waiting for the
// periodic job; with retention by age, as soon as its newest point is older.
func TestRetentionRightAfterCompaction(t *testing.T) {
	r := newIncrRigRetaining(t, "sqlite", incr.Policy{MaxDeltas: 3}, 256<<10, clockwork.NewFakeClock(), backup.Retention{Count: 2})
	for range 5 {
		r.point(2, backup.ReasonSync)
	}
	if got := kinds2(points(t, r.st)); got != "bdddb" {
		t.Fatalf("points %s; the old chain is still needed by the newest two", got)
	}
	r.point(2, backup.ReasonSync)
	if got := kinds2(points(t, r.st)); got != "bd" {
		t.Fatalf("points %s; want the old chain gone once the newest two are in the new one", got)
	}
	noUnreferencedPieces(t, r.st)
}

// Retention by age runs after a point once the old chain's newest point is
// older than the age, not only at the periodic job.
func TestRetentionByAgeRunsAfterAPointOnceTheOldChainAges(t *testing.T) {
	clock := clockwork.NewFakeClock()
	r := newIncrRigRetaining(t, "sqlite", incr.Policy{MaxDeltas: 1}, 256<<10, clock, backup.Retention{Age: time.Hour})
	r.point(2, backup.ReasonSync)
	r.point(2, backup.ReasonSync)
	clock.Advance(time.Minute)
	r.point(2, backup.ReasonSync) // a new base: the old chain is a minute old
	if got := kinds2(points(t, r.st)); got != "bdb" {
		t.Fatalf("points %s; the old chain is younger than the age", got)
	}
	clock.Advance(time.Hour)
	r.point(2, backup.ReasonSync)
	if got := kinds2(points(t, r.st)); got != "bd" {
		t.Fatalf("points %s; want the old chain gone once older than the age", got)
	}
	noUnreferencedPieces(t, r.st)
}

// Under churn (a base every other point, retention after each) the pipeline
// logs nothing at INFO: the minute's summary counts bases and says what is
// stored.
func TestBasesAndRetentionAfterAPointLogBelowInfo(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	r := newIncrRigLogging(t, "sqlite", incr.Policy{MaxDeltas: 1}, 256<<10, clockwork.NewFakeClock(), backup.Retention{Count: 1}, log)
	for range 8 {
		r.point(2, backup.ReasonSync)
	}
	if got := kinds2(points(t, r.st)); got != "bd" {
		t.Fatalf("points %s; want bases taken and old chains retired", got)
	}
	if buf.Len() > 0 {
		t.Fatalf("logged at INFO or above:\n%s", buf.String())
	}
}

// The base that brings the database up to date with the local fallback
// after an outage is recorded as a catch-up, not as a scheduled point.
func TestCatchUpPointIsRecordedAsCatchUp(t *testing.T) {
	r := newIncrRig(t, "sqlite", incr.Policy{})
	r.point(2, backup.ReasonSync)
	write(t, r.path, 2)
	o, err := r.pipe.Point(context.Background(), backup.Run{Job: backup.JobInfo{Reason: backup.ReasonSync}}) // the database is away
	if err != nil || o.Where != bus.StoredLocal {
		t.Fatalf("point without the database = %+v, %v", o, err)
	}
	o, ran, err := r.pipe.Ship(context.Background(), r.st)
	if err != nil || !ran || o.Where != bus.StoredDatabase {
		t.Fatalf("ship = %+v, %v, %v", o, ran, err)
	}
	list := points(t, r.st)
	if list[0].Reason != backup.ReasonCatchUp || list[0].Kind != backup.PointBase {
		t.Fatalf("catch-up point = %+v; want a base recorded as %q", list[0], backup.ReasonCatchUp)
	}
}
