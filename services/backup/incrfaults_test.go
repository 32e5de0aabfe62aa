package backup_test

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// killedPointStore kills point inserts while armed: the transaction has stored
// the pieces and the point and fails at its very end, as a job killed
// before its commit.
type killedPointStore struct {
	backup.Store
	armed *atomic.Bool
}

var errKilled = errors.New("killed before commit")

func (s *killedPointStore) InsertPoint(ctx context.Context, p backup.NewPoint, inTx backup.InTx) (int64, error) {
	return s.Store.InsertPoint(ctx, p, func(ctx context.Context, tx backup.Tx) error {
		if inTx != nil {
			if err := inTx(ctx, tx); err != nil {
				return err
			}
		}
		if s.armed.Load() {
			return errKilled
		}
		return nil
	})
}

// Crash during a delta: no partial point is visible (no row, no piece of
// it), the point goes to the local fallback, and a new dyno restores the
// previous point from the database.
func TestCrashDuringADeltaLeavesThePreviousPoint(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			st := db.mustOpen(t)
			dir := t.TempDir()
			newStore(t, dir, 256<<10)
			before := write(t, filepath.Join(dir, "session.db"), 3)
			var armed atomic.Bool
			open := func(ctx context.Context) (backup.Store, error) {
				s, err := db.open(ctx)
				if err != nil {
					return nil, err
				}
				return &killedPointStore{Store: s, armed: &armed}, nil
			}
			in := start(t, db, instOpts{dataDir: dir, env: syncEnv(), open: open})
			base := in.waitPoints(st, 1)
			stats, _ := st.PointStats(context.Background(), session)
			armed.Store(true)
			write(t, in.sessionPath(), 10)
			testwait.For(t, 30*time.Second, "the point in the local fallback", func() bool {
				in.clock.Advance(100 * time.Millisecond)
				l, _ := backup.LocalPoints{Dir: filepath.Join(dir, "backups", "incr")}.List()
				return len(l) > 0
			})
			after, _ := st.PointStats(context.Background(), session)
			if after != stats || len(points(t, st)) != 1 {
				t.Fatalf("a killed insert left %+v (before %+v)", after, stats)
			}
			// The dyno dies; a new one on an empty disk restores the base
			// once it has the lease (released here: a standby takes a dead
			// holder's after watching it for a TTL).
			if err := in.stop(); err != nil {
				t.Fatal(err)
			}
			if err := st.ReleaseLease(context.Background(), session, in.name); err != nil {
				t.Fatal(err)
			}
			second := start(t, db, instOpts{env: syncEnv()})
			rep := second.restoreReply(time.Second)
			if !rep.OK || !rep.Restored || rep.SnapshotID != base[0].ID {
				t.Fatalf("restore = %+v; want the base %d", rep, base[0].ID)
			}
			if _, maxN, _ := wastore.Writes(context.Background(), second.sessionPath()); maxN != before {
				t.Fatalf("restored writes up to %d; want %d", maxN, before)
			}
		})
	}
}

// tamper runs a statement on the test database directly.
func tamper(t *testing.T, db database, q string, args ...any) int64 {
	t.Helper()
	ctx := context.Background()
	if db.kind == "postgres" {
		conn, err := pgx.Connect(ctx, db.url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		tag, err := conn.Exec(ctx, q, args...)
		if err != nil {
			t.Fatal(err)
		}
		return tag.RowsAffected()
	}
	sdb, err := sql.Open("sqlite", "file:"+db.path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer sdb.Close()
	res, err := sdb.ExecContext(ctx, q, args...)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := res.RowsAffected()
	return n
}

// seedChain stores a base and two deltas of one store through a running
// instance, and returns the points (newest first) with the highest write
// each one holds.
func seedChain(t *testing.T, db database) ([]backup.PointInfo, []int64) {
	t.Helper()
	st := db.mustOpen(t)
	dir := t.TempDir()
	write(t, newStore(t, dir, 256<<10), 2)
	in := start(t, db, instOpts{dataDir: dir, env: syncEnv()})
	in.waitPoints(st, 1)
	var writes []int64
	_, w0, _ := wastore.Writes(context.Background(), in.sessionPath())
	writes = append(writes, w0)
	for n := 2; n <= 3; n++ {
		writes = append(writes, write(t, in.sessionPath(), 4))
		in.waitPoints(st, n)
	}
	in.cancel()
	<-in.done
	in.done <- nil
	list := points(t, st)
	if len(list) != 3 {
		t.Fatalf("seeded %d points; want 3", len(list))
	}
	return list, []int64{writes[2], writes[1], writes[0]}
}

// A corrupt delta and a missing piece: restore falls back to the newest
// point that verifies, and says which.
func TestCorruptDeltaAndMissingPieceFallBack(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			list, writes := seedChain(t, db)
			st := db.mustOpen(t)

			// The newest delta's manifest is damaged: the one before it.
			tamper(t, db, `UPDATE blacksky_points SET manifest = $1 WHERE id = $2`, []byte("garbage"), list[0].ID)
			res, maxN := restoreNewest(t, st, nil)
			if res.Point == nil || res.Point.ID != list[1].ID || res.Point.Skipped != 1 || maxN != writes[1] {
				t.Fatalf("restored %+v up to %d; want point %d with write %d", res.Point, maxN, list[1].ID, writes[1])
			}
			// The middle delta's own pieces go missing: the base.
			n := tamper(t, db, `DELETE FROM blacksky_pieces WHERE session_id = $1 AND id IN
				(SELECT piece_id FROM blacksky_point_pieces WHERE point_id = $2)
				AND id NOT IN (SELECT piece_id FROM blacksky_point_pieces WHERE point_id = $3)`, session, list[1].ID, list[2].ID)
			if n == 0 {
				t.Fatal("no piece of the delta deleted")
			}
			res, maxN = restoreNewest(t, st, nil)
			if res.Point == nil || res.Point.ID != list[2].ID || res.Point.Kind != "base" || maxN != writes[2] {
				t.Fatalf("restored %+v up to %d; want the base %d with write %d", res.Point, maxN, list[2].ID, writes[2])
			}
		})
	}
}

// restore --at and --id of a point pick exactly what they name.
func TestRestoreAtTimeAndPointID(t *testing.T) {
	db := newDatabase(t, "sqlite")
	list, writes := seedChain(t, db)
	st := db.mustOpen(t)
	restore := func(target backup.Target) (backup.RestoreResult, int64, error) {
		dir := t.TempDir()
		r := &backup.Restorer{Store: st, Session: session, SessionPath: dir + "/session.db", TmpDir: dir, Log: discard()}
		res, err := r.RestoreTarget(context.Background(), target)
		if err != nil || !res.Restored {
			return res, 0, err
		}
		_, maxN, err := wastore.Writes(context.Background(), r.SessionPath)
		return res, maxN, err
	}
	res, maxN, err := restore(backup.Target{PointID: list[1].ID})
	if err != nil || res.Point == nil || res.Point.ID != list[1].ID || maxN != writes[1] {
		t.Fatalf("--id p%d = %+v, %d, %v", list[1].ID, res.Point, maxN, err)
	}
	res, maxN, err = restore(backup.Target{At: list[1].CreatedAt})
	if err != nil || res.Point == nil || res.Point.ID != list[1].ID || maxN != writes[1] {
		t.Fatalf("--at %s = %+v, %d, %v", list[1].CreatedAt, res.Point, maxN, err)
	}
	// Before every point: says so, rather than "nothing verifies".
	if res, _, err := restore(backup.Target{At: list[2].CreatedAt.Add(-time.Second)}); !errors.Is(err, backup.ErrNotFound) ||
		res.Restored || !strings.Contains(err.Error(), "nothing stored at or before") {
		t.Fatalf("--at before every point = %+v, %v; want nothing restored: nothing stored at or before", res, err)
	}
	if _, _, err := restore(backup.Target{PointID: list[0].ID + 100}); !errors.Is(err, backup.ErrNotFound) {
		t.Fatalf("unknown point = %v; want ErrNotFound", err)
	}
	// A point that does not verify is not replaced by an older one.
	tamper(t, db, `UPDATE blacksky_points SET manifest = $1 WHERE id = $2`, []byte("garbage"), list[0].ID)
	if res, _, err := restore(backup.Target{PointID: list[0].ID}); err == nil {
		t.Fatalf("a broken chosen point restored %+v", res)
	}
}

// Two instances: once another holder took the lease (a new generation),
// the loser's late point is refused, and restore never picks it.
func TestLoserLateWriteRefused(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			st := db.mustOpen(t)
			dir := t.TempDir()
			newStore(t, dir, 256<<10)
			in := start(t, db, instOpts{dataDir: dir, env: syncEnv()})
			first := in.waitPoints(st, 1)
			steal(t, st, "thief")
			lease, _, _ := st.AcquireLease(context.Background(), session, "thief", time.Now(), time.Hour, backup.Lease{})
			if lease.Generation <= first[0].Generation {
				t.Fatalf("the thief's generation %d is not above %d", lease.Generation, first[0].Generation)
			}
			write(t, in.sessionPath(), 5)
			// The loser notices its loss at its next renewal at the latest;
			// meanwhile its points must be refused.
			for range 50 {
				in.clock.Advance(100 * time.Millisecond)
			}
			testwait.For(t, 20*time.Second, "the loser in standby", func() bool {
				in.clock.Advance(100 * time.Millisecond)
				state, _ := in.svc.Status()
				return state == bus.StateStandby
			})
			if list := points(t, st); len(list) != 1 {
				t.Fatalf("points after the takeover = %+v; want the loser's first one only", list)
			}
		})
	}
}

// Database down: points go to the local fallback (a base, then deltas);
// back: a fresh base reaches the database and the fallback is emptied.
func TestDatabaseDownThenBackCatchesUp(t *testing.T) {
	db := proxiedPostgres(t)
	st := db.direct.mustOpen(t)
	dir := t.TempDir()
	newStore(t, dir, 256<<10)
	in := start(t, db.via, instOpts{dataDir: dir, env: syncEnv()})
	in.waitPoints(st, 1)
	local := backup.LocalPoints{Dir: filepath.Join(dir, "backups", "incr")}
	db.proxy.Down()
	write(t, in.sessionPath(), 5)
	testwait.For(t, 60*time.Second, "local points", func() bool {
		in.clock.Advance(200 * time.Millisecond)
		l, _ := local.List()
		return len(l) >= 1
	})
	last := write(t, in.sessionPath(), 5)
	testwait.For(t, 60*time.Second, "a local delta", func() bool {
		in.clock.Advance(200 * time.Millisecond)
		l, _ := local.List()
		return len(l) >= 2
	})
	if len(points(t, st)) != 1 {
		t.Fatal("a point reached the database through a cut connection")
	}
	// A restore on this disk while the database is away uses the fallback.
	ldir := t.TempDir()
	lr := &backup.Restorer{Session: session, SessionPath: ldir + "/session.db", LocalPoints: local, TmpDir: ldir, Log: discard()}
	if res, err := lr.RestoreTarget(context.Background(), backup.Target{}); err != nil || res.Source != bus.SourceLocal || res.Point == nil {
		t.Fatalf("local restore = %+v, %v", res, err)
	} else if _, maxN, _ := wastore.Writes(context.Background(), lr.SessionPath); maxN != last {
		t.Fatalf("local restore holds writes up to %d; want %d", maxN, last)
	}
	db.proxy.Up()
	testwait.For(t, 60*time.Second, "the catch-up base in the database", func() bool {
		in.clock.Advance(200 * time.Millisecond)
		l, _ := local.List()
		return len(points(t, st)) >= 2 && len(l) == 0
	})
	list := points(t, st)
	if list[0].Kind != backup.PointBase {
		t.Fatalf("catch-up point = %+v; want a base", list[0])
	}
	if _, maxN := restoreNewest(t, st, nil); maxN != last {
		t.Fatalf("restored up to %d after catch-up; want %d", maxN, last)
	}
	if entries, _ := os.ReadDir(filepath.Join(local.Dir, "pieces")); len(entries) != 0 {
		t.Fatalf("the fallback kept %d pieces after catch-up", len(entries))
	}
}
