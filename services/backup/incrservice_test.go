package backup_test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// syncEnv turns continuous replication on (one point a second at most).
func syncEnv(kv ...string) map[string]string {
	env := map[string]string{"SYNC_INTERVAL": "1s"}
	for i := 0; i+1 < len(kv); i += 2 {
		env[kv[i]] = kv[i+1]
	}
	return env
}

func points(t testing.TB, st backup.Store) []backup.PointInfo {
	t.Helper()
	list, err := st.ListPoints(context.Background(), session, 100000)
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// waitPoints advances the instance's fake clock (the watcher's polls and
// SYNC_INTERVAL) until the database holds n points.
func (in *instance) waitPoints(st backup.Store, n int) []backup.PointInfo {
	in.t.Helper()
	var list []backup.PointInfo
	testwait.For(in.t, 30*time.Second, "points in the database", func() bool {
		in.clock.Advance(100 * time.Millisecond)
		list = points(in.t, st)
		return len(list) >= n
	})
	return list
}

// restorePointsInto restores the newest point (or snapshot) of st into a
// fresh dir and returns the highest write it holds.
func restoreNewest(t testing.TB, st backup.Store, key []byte) (backup.RestoreResult, int64) {
	t.Helper()
	path, res := restoreInto(t, st, key)
	if !res.Restored {
		t.Fatalf("nothing restored: %+v", res)
	}
	count, maxN, err := wastore.Writes(context.Background(), path)
	if err != nil || count != maxN {
		t.Fatalf("restored writes: %d of %d (%v): not a committed prefix", count, maxN, err)
	}
	return res, maxN
}

// A burst of commits within one SYNC_INTERVAL becomes one delta on the base
// the service took when it started; the delta restores every commit.
func TestSyncShipsACommitBurstAsOneDelta(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			st := db.mustOpen(t)
			dir := t.TempDir()
			newStore(t, dir, 512<<10)
			in := start(t, db, instOpts{dataDir: dir, env: syncEnv()})
			base := in.waitPoints(st, 1)
			if base[0].Kind != backup.PointBase || base[0].Generation < 1 || base[0].Reason != backup.ReasonSync {
				t.Fatalf("first point = %+v; want a sync base", base[0])
			}
			last := write(t, in.sessionPath(), 20)
			in.waitPoints(st, 2)
			// Nothing more comes without commits.
			for range 30 {
				in.clock.Advance(100 * time.Millisecond)
			}
			list := points(t, st)
			if len(list) != 2 {
				t.Fatalf("%d points after one burst; want base and one delta: %+v", len(list), list)
			}
			d := list[0]
			if d.Kind != backup.PointDelta || d.Parent != base[0].ManifestID || d.Generation != base[0].Generation || d.Seq != base[0].Seq+1 {
				t.Fatalf("delta = %+v; want on the base %+v", d, base[0])
			}
			if d.StoredBytes*4 > base[0].StoredBytes {
				t.Fatalf("delta stored %d bytes, base %d: a delta should cost what changed", d.StoredBytes, base[0].StoredBytes)
			}
			res, maxN := restoreNewest(t, st, nil)
			if res.Point == nil || res.Point.ID != d.ID || maxN != last {
				t.Fatalf("restored %+v up to write %d; want point %d with write %d", res.Point, maxN, d.ID, last)
			}
			_, details := in.svc.Status()
			if details.Points != 2 || details.StoredBytes == 0 || details.Generation != d.Generation || details.LastPointAt == nil ||
				details.LastBaseAt == nil {
				t.Fatalf("heartbeat details = %+v", details)
			}
		})
	}
}

// P.backup.request is answered once a point covering it is committed; the
// log names the point as `blacksky snapshots` and `restore --id` do.
func TestBackupRequestAnsweredByTheCoveringPoint(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			st := db.mustOpen(t)
			dir := t.TempDir()
			newStore(t, dir, 256<<10)
			var logs syncBuf
			in := start(t, db, instOpts{dataDir: dir, env: syncEnv(), logTo: logs.write})
			in.waitPoints(st, 1)
			last := write(t, in.sessionPath(), 5)
			rep := in.backupNow(bus.ReasonManual)
			if !rep.OK || rep.Stored != bus.StoredDatabase || rep.Snapshot == nil || rep.Snapshot.ID == 0 || rep.JobID == 0 {
				t.Fatalf("reply = %+v", rep)
			}
			var got *backup.PointInfo
			for _, p := range points(t, st) {
				if p.ID == rep.Snapshot.ID {
					got = &p
				}
			}
			if got == nil || got.DBSHA256 != rep.Snapshot.SHA256 {
				t.Fatalf("reply names point %d (%s), not in the database", rep.Snapshot.ID, rep.Snapshot.SHA256)
			}
			named := regexp.MustCompile(fmt.Sprintf(`msg="snapshot done".* id=p%d `, rep.Snapshot.ID))
			testwait.For(t, 10*time.Second, "the log to name point p"+strconv.FormatInt(rep.Snapshot.ID, 10), func() bool {
				return named.MatchString(logs.String())
			})
			if _, maxN := restoreNewest(t, st, nil); maxN != last {
				t.Fatalf("restored up to %d; want %d", maxN, last)
			}
			// Unchanged since: the same point answers.
			again := in.backupNow(bus.ReasonManual)
			if !again.OK || !again.Snapshot.Unchanged || again.Snapshot.ID != rep.Snapshot.ID {
				t.Fatalf("second reply = %+v; want unchanged point %d", again.Snapshot, rep.Snapshot.ID)
			}
		})
	}
}

// A new dyno (empty disk) restores the newest point: the shutdown point,
// the final delta of the first instance.
func TestRestoreOnStartFromPoints(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			st := db.mustOpen(t)
			key := randHex(32)
			env := syncEnv("SESSION_ENCRYPTION_KEY", key)
			dir := t.TempDir()
			newStore(t, dir, 256<<10)
			first := start(t, db, instOpts{dataDir: dir, env: env})
			first.waitPoints(st, 1)
			last := write(t, first.sessionPath(), 9)
			if err := first.stop(); err != nil {
				t.Fatal(err)
			}
			list := points(t, st)
			if len(list) < 2 || list[0].Reason != bus.ReasonShutdown || list[0].Kind != backup.PointDelta {
				t.Fatalf("points = %+v; want the shutdown delta last", list)
			}
			second := start(t, db, instOpts{env: env})
			rep := second.restoreReply(time.Second)
			if !rep.OK || !rep.Restored || rep.Source != bus.SourceDatabase || rep.SnapshotID != list[0].ID {
				t.Fatalf("restore reply = %+v; want point %d", rep, list[0].ID)
			}
			if _, maxN, err := wastore.Writes(context.Background(), second.sessionPath()); err != nil || maxN != last {
				t.Fatalf("restored store has writes up to %d (%v); want %d", maxN, err, last)
			}
			// The new holder starts a new generation with a fresh base.
			next := second.waitPoints(st, len(list)+1)
			if next[0].Kind != backup.PointBase || next[0].Generation <= list[0].Generation {
				t.Fatalf("first point of the new holder = %+v; want a base of a generation above %d", next[0], list[0].Generation)
			}
		})
	}
}
