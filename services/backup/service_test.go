package backup_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// restoreInto restores the newest snapshot of db into a fresh dir and returns
// the session path.
func restoreInto(t testing.TB, st backup.Store, key []byte) (string, backup.RestoreResult) {
	t.Helper()
	dir := t.TempDir()
	r := &backup.Restorer{Store: st, Session: session, SessionPath: dir + "/session.db",
		Local: backup.Local{Dir: dir + "/backups"}, TmpDir: dir, Key: key, Log: discard()}
	res, err := r.Restore(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	return r.SessionPath, res
}

func TestSnapshotWhileWritingRestoresCommittedPrefix(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dir := t.TempDir()
			path := newStore(t, dir, 2<<20)
			write(t, path, 5)
			in := start(t, db, instOpts{dataDir: dir})

			w, err := wastore.StartWriter(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			testwait.For(t, 10*time.Second, "writer running", func() bool { return w.Last() > 10 })
			// Every write committed before the request is in the snapshot
			// that answers it.
			before := w.Last()
			rep := in.backupNow("manual")
			last, err := w.Stop()
			if err != nil {
				t.Fatal(err)
			}
			if !rep.OK || rep.Snapshot == nil || rep.Snapshot.ID == 0 || rep.Snapshot.Unchanged || rep.JobID == 0 {
				t.Fatalf("reply = %+v", rep)
			}

			st := db.mustOpen(t)
			restored, res := restoreInto(t, st, nil)
			if res.SnapshotID != rep.Snapshot.ID || res.Source != bus.SourceDatabase {
				t.Fatalf("restored %+v; want snapshot %d from the database", res, rep.Snapshot.ID)
			}
			if err := snapshot.Check(context.Background(), restored); err != nil {
				t.Fatalf("restored store fails integrity_check: %v", err)
			}
			count, maxN, err := wastore.Writes(context.Background(), restored)
			if err != nil {
				t.Fatal(err)
			}
			if count != maxN || maxN < before || maxN > last {
				t.Fatalf("restored writes: count %d, max %d, committed before the request %d, writer reached %d: not a committed prefix covering the request", count, maxN, before, last)
			}
			// The local fallback holds the same snapshot.
			files, _ := backup.Local{Dir: dir + "/backups"}.List()
			if len(files) != 1 || files[0].SHA256 != rep.Snapshot.SHA256 {
				t.Fatalf("local fallback = %+v", files)
			}
		})
	}
}

func TestUnchangedStoreNotStoredAgain(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 256<<10)
	in := start(t, db, instOpts{dataDir: dir})
	first := in.backupNow("manual")
	second := in.backupNow("manual")
	if !first.OK || first.Snapshot.Unchanged {
		t.Fatalf("first = %+v", first)
	}
	if !second.OK || !second.Snapshot.Unchanged || second.Snapshot.ID != first.Snapshot.ID || second.Snapshot.SHA256 != first.Snapshot.SHA256 {
		t.Fatalf("second = %+v; want unchanged with id %d", second.Snapshot, first.Snapshot.ID)
	}
	if l, _ := db.mustOpen(t).List(context.Background(), session, 10); len(l) != 1 {
		t.Fatalf("%d rows; want 1", len(l))
	}
}

func TestUnpairedStoreNeverStored(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dir := t.TempDir()
			if err := wastore.CreateUnpaired(context.Background(), dir+"/session.db"); err != nil {
				t.Fatal(err)
			}
			in := start(t, db, instOpts{dataDir: dir})
			rep := in.backupNow("manual")
			if rep.OK || !strings.Contains(rep.Error, "no linked device") {
				t.Fatalf("reply = %+v; want ok:false naming the missing device", rep)
			}
			if err := in.stop(); err != nil { // the shutdown snapshot must skip it too
				t.Fatal(err)
			}
			if l, _ := db.mustOpen(t).List(context.Background(), session, 10); len(l) != 0 {
				t.Fatalf("unpaired store stored: %+v", l)
			}
			if files, _ := (backup.Local{Dir: dir + "/backups"}).List(); len(files) != 0 {
				t.Fatalf("unpaired store in the local fallback: %+v", files)
			}
		})
	}
}

func TestBurstOfRequestsCoalesces(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dir := t.TempDir()
			newStore(t, dir, 1<<20)
			in := start(t, db, instOpts{dataDir: dir})

			const n = 100
			replies := make([]bus.BackupReply, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			began := time.Now()
			for i := range n {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					errs[i] = bus.Request(ctx, in.nc, in.subj.BackupRequest(), bus.BackupRequest{}, &replies[i])
				})
			}
			wg.Wait()
			t.Logf("100 requests answered in %s", time.Since(began))
			jobs := map[int64]bool{}
			ids := map[int64]bool{}
			for i, r := range replies {
				if errs[i] != nil || !r.OK || r.Snapshot == nil || r.Snapshot.ID == 0 || len(r.Snapshot.SHA256) != 64 {
					t.Fatalf("reply %d = %+v, %v", i, r, errs[i])
				}
				jobs[r.JobID] = true
				ids[r.Snapshot.ID] = true
			}
			rows, _ := db.mustOpen(t).List(context.Background(), session, 100)
			if len(jobs) > 2 || len(rows) > 2 {
				t.Fatalf("%d jobs and %d rows for a burst; want at most 2", len(jobs), len(rows))
			}
			for id := range ids {
				found := false
				for _, r := range rows {
					found = found || r.ID == id
				}
				if !found {
					t.Fatalf("reply names snapshot %d, not in the database", id)
				}
			}
		})
	}
}

// A request that arrives after a snapshot has read the store must get a later
// snapshot: one that holds the writes made before the request.
func TestRequestCoveredBySnapshotReadAfterIt(t *testing.T) {
	db := newDatabase(t, "postgres")
	dir := t.TempDir()
	path := newStore(t, dir, 256<<10)
	in := start(t, db, instOpts{dataDir: dir})
	for range 3 {
		last := write(t, path, 3)
		rep := in.backupNow("manual")
		if !rep.OK || rep.Snapshot.Unchanged {
			t.Fatalf("reply = %+v", rep)
		}
		restored, res := restoreInto(t, db.mustOpen(t), nil)
		_, maxN, err := wastore.Writes(context.Background(), restored)
		if err != nil || res.SnapshotID != rep.Snapshot.ID || maxN < last {
			t.Fatalf("snapshot %d holds writes up to %d (%v); the request came after write %d", rep.Snapshot.ID, maxN, err, last)
		}
	}
}

func TestBadRequests(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir})
	for _, body := range []string{`{bad`, `{"reason":"manual","extra":1}`, `[]`, `{"reason":"Bad Reason"}`, `{"reason":"x"} {}`} {
		msg, err := in.nc.Request(in.subj.BackupRequest(), []byte(body), 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		var rep bus.BackupReply
		if err := jsonUnmarshal(msg.Data, &rep); err != nil || rep.OK || rep.Error == "" {
			t.Fatalf("%s: reply %s; want ok:false with the reason", body, msg.Data)
		}
	}
	// A plain publish (no reply subject) enqueues a snapshot.
	done := make(chan *nats.Msg, 1)
	sub, err := in.nc.ChanSubscribe(in.subj.BackupDone(), done)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := in.nc.Publish(in.subj.BackupRequest(), nil); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-done:
		var ev bus.BackupDone
		if err := jsonUnmarshal(m.Data, &ev); err != nil || ev.SnapshotID == 0 || ev.Reason != "manual" || ev.Session != session || ev.StoredBytes == 0 {
			t.Fatalf("backup.done = %s", m.Data)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("plain publish did not produce a snapshot")
	}
}

func TestPairedEventTakesSnapshot(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir})
	done := make(chan *nats.Msg, 4)
	sub, _ := in.nc.ChanSubscribe(in.subj.BackupDone(), done)
	defer sub.Unsubscribe()
	if err := bus.Publish(in.nc, in.subj.Conn(bus.ConnPaired), bus.ConnEvent{Kind: bus.ConnPaired, JID: "1@s.whatsapp.net", Instance: in.unit}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-done:
		var ev bus.BackupDone
		_ = jsonUnmarshal(m.Data, &ev)
		if ev.Reason != bus.ReasonPaired || ev.SnapshotID == 0 {
			t.Fatalf("backup.done = %s", m.Data)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("conn.paired did not produce a snapshot")
	}
	rows, _ := db.mustOpen(t).List(context.Background(), session, 10)
	if len(rows) != 1 || rows[0].Reason != bus.ReasonPaired {
		t.Fatalf("rows = %+v", rows)
	}
}

func TestRestoreOnStartFromDatabase(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			key := randHex(32)
			env := map[string]string{"SESSION_ENCRYPTION_KEY": key}
			dir := t.TempDir()
			path := newStore(t, dir, 512<<10)
			last := write(t, path, 7)
			first := start(t, db, instOpts{dataDir: dir, env: env})
			if rep := first.restoreReply(time.Second); !rep.OK || rep.Restored || rep.Source != bus.SourceExisting {
				t.Fatalf("first restore reply = %+v", rep)
			}
			if err := first.stop(); err != nil {
				t.Fatal(err)
			}
			// A new dyno: empty disk, same database.
			second := start(t, db, instOpts{env: env})
			rep := second.restoreReply(time.Second)
			if !rep.OK || !rep.Restored || rep.Source != bus.SourceDatabase || rep.SnapshotID == 0 {
				t.Fatalf("restore reply = %+v", rep)
			}
			if again := second.restoreReply(time.Second); again != rep {
				t.Fatalf("second ask = %+v; want the same %+v", again, rep)
			}
			_, maxN, err := wastore.Writes(context.Background(), second.sessionPath())
			if err != nil || maxN != last {
				t.Fatalf("restored store has writes up to %d (%v); want %d", maxN, err, last)
			}
			rows, _ := db.mustOpen(t).List(context.Background(), session, 10)
			if len(rows) != 1 || rows[0].Reason != bus.ReasonShutdown {
				t.Fatalf("rows = %+v; want the one shutdown snapshot", rows)
			}
		})
	}
}

func TestCorruptNewestSnapshotSkipped(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dir := t.TempDir()
			path := newStore(t, dir, 256<<10)
			in := start(t, db, instOpts{dataDir: dir})
			good := in.backupNow("manual")
			write(t, path, 2)
			newest := in.backupNow("manual")
			if err := in.stop(); err != nil {
				t.Fatal(err)
			}
			st := db.mustOpen(t)
			// Damage the newest snapshot: copy its payload into a newer row
			// with one byte flipped in the body.
			p, err := st.Payload(context.Background(), newest.Snapshot.ID)
			if err != nil {
				t.Fatal(err)
			}
			p[len(p)/2] ^= 0x40
			bad, err := st.InsertSnapshot(context.Background(), backup.NewSnapshot{SessionID: session,
				CreatedAt: time.Now().Add(time.Hour), Reason: "manual", SHA256: newest.Snapshot.SHA256,
				SizeBytes: newest.Snapshot.Bytes, StoredBytes: int64(len(p)), Format: snapshot.FormatV1, Payload: p}, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, res := restoreInto(t, st, nil)
			if res.SnapshotID == bad || res.SnapshotID != newest.Snapshot.ID || res.SnapshotID == good.Snapshot.ID {
				t.Fatalf("restored %d; want %d (bad %d skipped)", res.SnapshotID, newest.Snapshot.ID, bad)
			}
		})
	}
}

func TestWrongKeyRefusedNothingOverwritten(t *testing.T) {
	db := newDatabase(t, "postgres")
	dir := t.TempDir()
	newStore(t, dir, 256<<10)
	in := start(t, db, instOpts{dataDir: dir, env: map[string]string{"SESSION_ENCRYPTION_KEY": randHex(32)}})
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup: %+v", rep)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	// A dyno with another key and a damaged session store: restore must be
	// refused, naming the variable, and the damaged file left as it was.
	dir2 := t.TempDir()
	damaged := []byte("not a sqlite database, but the operator's to inspect")
	if err := os.WriteFile(dir2+"/session.db", damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	other := start(t, db, instOpts{dataDir: dir2, env: map[string]string{"SESSION_ENCRYPTION_KEY": randHex(32)}})
	rep := other.restoreReply(time.Second)
	if rep.OK || !strings.Contains(rep.Error, "SESSION_ENCRYPTION_KEY") {
		t.Fatalf("restore reply = %+v; want ok:false naming SESSION_ENCRYPTION_KEY", rep)
	}
	got, _ := os.ReadFile(dir2 + "/session.db")
	if string(got) != string(damaged) {
		t.Fatal("session.db was overwritten")
	}
}

func TestLeaseHandover(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dirA := t.TempDir()
			path := newStore(t, dirA, 256<<10)
			// Each dyno has its own fake clock, so the lease must not expire
			// while the test advances b's clock to make it retry.
			ttl := 1000 * time.Hour
			a := start(t, db, instOpts{dataDir: dirA, name: "dyno-a", leaseTTL: ttl})

			standby := make(chan *nats.Msg, 16)
			b := start(t, db, instOpts{name: "dyno-b", noWait: true, leaseTTL: ttl, retry: time.Second})
			sub, _ := b.nc.ChanSubscribe(b.subj.Conn(bus.ConnStandby), standby)
			defer sub.Unsubscribe()
			// b waits: it announces standby (advance its clock to see a retry).
			select {
			case <-standby:
			case <-advanceUntil(t, b, standby):
			}
			// While a holds the lease, b does not answer the restore question.
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			var rep bus.RestoreReply
			err := bus.Request(ctx, b.nc, b.subj.SessionRestoreFor(b.unit), struct{}{}, &rep)
			cancel()
			if err == nil {
				t.Fatalf("standby instance answered restore: %+v", rep)
			}
			// a keeps writing, then stops: shutdown snapshot, lease released.
			last := write(t, path, 9)
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
			// b takes over and restores what a left.
			testwait.For(t, 20*time.Second, "b to take over", func() bool {
				b.clock.Advance(time.Second)
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				defer cancel()
				return bus.Request(ctx, b.nc, b.subj.SessionRestoreFor(b.unit), struct{}{}, &rep) == nil
			})
			if !rep.OK || !rep.Restored || rep.Source != bus.SourceDatabase {
				t.Fatalf("b restore = %+v", rep)
			}
			_, maxN, err := wastore.Writes(context.Background(), b.sessionPath())
			if err != nil || maxN != last {
				t.Fatalf("b restored writes up to %d (%v); a's last write was %d", maxN, err, last)
			}
			lease, held, err := db.mustOpen(t).AcquireLease(context.Background(), session, "probe", time.Now(), time.Minute, backup.Lease{})
			if err != nil || held || lease.Holder != "dyno-b" {
				t.Fatalf("lease = %+v held=%v err=%v; want dyno-b", lease, held, err)
			}
		})
	}
}

// advanceUntil advances in's clock until ch has a message (returned through
// a closed channel so it can sit in a select).
func advanceUntil(t *testing.T, in *instance, ch chan *nats.Msg) <-chan struct{} {
	t.Helper()
	out := make(chan struct{})
	testwait.For(t, 20*time.Second, "standby event", func() bool {
		select {
		case m := <-ch:
			ch <- m
			return true
		default:
			in.clock.Advance(time.Second)
			return false
		}
	})
	close(out)
	return out
}

func TestShutdownSnapshotAndRelease(t *testing.T) {
	db := newDatabase(t, "postgres")
	dir := t.TempDir()
	path := newStore(t, dir, 256<<10)
	in := start(t, db, instOpts{dataDir: dir, name: "dyno-a"})
	first := in.backupNow("manual")
	last := write(t, path, 4)
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	st := db.mustOpen(t)
	rows, _ := st.List(context.Background(), session, 10)
	if len(rows) != 2 || rows[0].Reason != bus.ReasonShutdown || rows[1].ID != first.Snapshot.ID {
		t.Fatalf("rows = %+v; want a shutdown snapshot on top", rows)
	}
	restored, _ := restoreInto(t, st, nil)
	if _, maxN, _ := wastore.Writes(context.Background(), restored); maxN != last {
		t.Fatalf("shutdown snapshot holds writes up to %d; want %d", maxN, last)
	}
	if _, held, err := st.AcquireLease(context.Background(), session, "next", time.Now(), time.Minute, backup.Lease{}); !held || err != nil {
		t.Fatalf("lease not released: %v %v", held, err)
	}
}

func TestDatabaseDownUsesLocalFallback(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 256<<10)
	down := func(context.Context) (backup.Store, error) { return nil, os.ErrDeadlineExceeded }
	// First run: no database at all; snapshots go to the local fallback.
	in := start(t, db, instOpts{dataDir: dir, open: down, dbWait: time.Nanosecond})
	rep := in.backupNow("manual")
	if !rep.OK || rep.Snapshot.ID != 0 || rep.Snapshot.SHA256 == "" {
		t.Fatalf("degraded reply = %+v; want ok with a local snapshot (id 0)", rep)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	// The session store is lost; the database is still down: restore from
	// the local fallback.
	for _, side := range []string{"", "-wal", "-shm"} {
		_ = os.Remove(dir + "/session.db" + side)
	}
	again := start(t, db, instOpts{dataDir: dir, open: down, dbWait: time.Nanosecond})
	r := again.restoreReply(time.Second)
	if !r.OK || !r.Restored || r.Source != bus.SourceLocal {
		t.Fatalf("restore = %+v; want from the local fallback", r)
	}
	if has, err := snapshot.HasDevice(context.Background(), again.sessionPath()); err != nil || !has {
		t.Fatalf("restored store: device %v, %v", has, err)
	}
}

func TestPlaintextRefusedInProduction(t *testing.T) {
	env := testEnv(t.TempDir())
	env["NODE_ENV"] = "production"
	cfg := loadConfig(t, env)
	_, err := backup.New(backup.Options{Config: backupConfig(cfg), NC: &nats.Conn{}, Open: newDatabase(t, "sqlite").open})
	if err == nil || !strings.Contains(err.Error(), "SESSION_ENCRYPTION_KEY") {
		t.Fatalf("err = %v; want a config error naming SESSION_ENCRYPTION_KEY", err)
	}
	env["ALLOW_PLAINTEXT_BACKUPS"] = "true"
	if _, err := backup.New(backup.Options{Config: backupConfig(loadConfig(t, env)), NC: &nats.Conn{}, Open: newDatabase(t, "sqlite").open}); err != nil {
		t.Fatalf("with ALLOW_PLAINTEXT_BACKUPS: %v", err)
	}
}

// A holder that died without releasing: the standby takes over once it has
// watched the lease row stay the same for a whole lease TTL (the holder's,
// 10 s), whatever its expiry says against the standby's clock: a crash
// takeover within the TTL, not the old minute.
func TestCrashTakeoverAfterOneTTLUnchanged(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	now := clockStart()
	if _, ok, err := st.AcquireLease(context.Background(), session, "dead-dyno", now.Add(-time.Hour), backup.DefaultLeaseTTL, backup.Lease{}); !ok || err != nil {
		t.Fatalf("seed lease: %v %v", ok, err)
	}
	b := start(t, db, instOpts{name: "dyno-b", noWait: true, retry: time.Second})
	var rep bus.RestoreReply
	testwait.For(t, 20*time.Second, "takeover", func() bool {
		b.clock.Advance(time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return bus.Request(ctx, b.nc, b.subj.SessionRestoreFor(b.unit), struct{}{}, &rep) == nil
	})
	if elapsed := b.clock.Since(now); elapsed < backup.DefaultLeaseTTL || elapsed > 15*time.Second {
		t.Fatalf("took over after %s of fake time; want one lease TTL (%s) of watching, and at most 15 s", elapsed, backup.DefaultLeaseTTL)
	}
	if !rep.OK || rep.Source != bus.SourceNone {
		t.Fatalf("restore = %+v", rep)
	}
}

func TestScheduledSnapshots(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	start(t, db, instOpts{dataDir: dir, env: map[string]string{"BACKUP_INTERVAL": "1s"}})
	st := db.mustOpen(t)
	testwait.For(t, 20*time.Second, "a scheduled snapshot", func() bool {
		rows, _ := st.List(context.Background(), session, 10)
		return len(rows) > 0 && rows[0].Reason == bus.ReasonScheduled
	})
}

func TestDamagedStoreWithoutSnapshotsMovedAside(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/session.db", []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	in := start(t, db, instOpts{dataDir: dir})
	if rep := in.restoreReply(time.Second); !rep.OK || rep.Restored || rep.Source != bus.SourceNone {
		t.Fatalf("restore = %+v", rep)
	}
	if got, err := os.ReadFile(dir + "/session.db.corrupt"); err != nil || string(got) != "garbage" {
		t.Fatalf("damaged store not kept aside: %q %v", got, err)
	}
	if _, err := os.Stat(dir + "/session.db"); !os.IsNotExist(err) {
		t.Fatalf("damaged store still in place: %v", err)
	}
}

// An empty disk with the database down: the service waits for the database
// rather than let the gateway start unlinked, then restores from it.
func TestEmptyDiskWaitsForDatabase(t *testing.T) {
	db := newDatabase(t, "postgres")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	first := start(t, db, instOpts{dataDir: dir})
	want := first.backupNow("manual")
	if err := first.stop(); err != nil {
		t.Fatal(err)
	}

	var up atomic.Bool
	open := func(ctx context.Context) (backup.Store, error) {
		if !up.Load() {
			return nil, errors.New("connection refused")
		}
		return db.open(ctx)
	}
	in := start(t, db, instOpts{open: open, dbWait: time.Second, noWait: true})
	// Well past DBWait, still no answer: nothing local to run on.
	for range 20 {
		in.clock.Advance(time.Second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	var rep bus.RestoreReply
	err := bus.Request(ctx, in.nc, in.subj.SessionRestoreFor(in.unit), struct{}{}, &rep)
	cancel()
	if err == nil {
		t.Fatalf("answered %+v while the database was down and the disk empty", rep)
	}
	up.Store(true)
	testwait.For(t, 20*time.Second, "restore once the database is up", func() bool {
		in.clock.Advance(10 * time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return bus.Request(ctx, in.nc, in.subj.SessionRestoreFor(in.unit), struct{}{}, &rep) == nil
	})
	if !rep.OK || !rep.Restored || rep.Source != bus.SourceDatabase || rep.SnapshotID < want.Snapshot.ID {
		t.Fatalf("restore = %+v; want snapshot %d or newer from the database", rep, want.Snapshot.ID)
	}
}

// crashingStore fails the first n snapshot transactions after the River job
// was completed inside them, as a crash before COMMIT would.
type crashingStore struct {
	backup.Store
	left atomic.Int32
}

var errCrash = errors.New("simulated crash before commit")

func (c *crashingStore) InsertSnapshot(ctx context.Context, n backup.NewSnapshot, hook backup.InTx) (int64, error) {
	if c.left.Add(-1) < 0 {
		return c.Store.InsertSnapshot(ctx, n, hook)
	}
	return c.Store.InsertSnapshot(ctx, n, func(ctx context.Context, tx backup.Tx) error {
		if err := hook(ctx, tx); err != nil {
			return err
		}
		return errCrash
	})
}

// A crash in the middle of the snapshot transaction leaves neither a row nor
// a completed job: River retries it and the retry stores the snapshot once.
func TestCrashMidSnapshotLeavesNoRow(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			dir := t.TempDir()
			newStore(t, dir, 128<<10)
			open := func(ctx context.Context) (backup.Store, error) {
				st, err := db.open(ctx)
				if err != nil {
					return nil, err
				}
				cs := &crashingStore{Store: st}
				cs.left.Store(1)
				return cs, nil
			}
			in := start(t, db, instOpts{dataDir: dir, open: open})
			done := make(chan *nats.Msg, 4)
			sub, _ := in.nc.ChanSubscribe(in.subj.BackupDone(), done)
			defer sub.Unsubscribe()

			rep := in.backupNow("manual")
			if rep.OK || !strings.Contains(rep.Error, errCrash.Error()) {
				t.Fatalf("reply = %+v; want the crash", rep)
			}
			st := db.mustOpen(t)
			// The store is in the database once the database answers again:
			// River retries the job (attempt 2), or the catch-up of the
			// local fallback gets there first. Either way it is a new row:
			// the crashed insert left none behind (it would show as
			// "unchanged" here).
			select {
			case m := <-done:
				var ev bus.BackupDone
				_ = jsonUnmarshal(m.Data, &ev)
				if ev.SnapshotID == 0 || ev.Unchanged {
					t.Fatalf("after the crash: %s; want a new row", m.Data)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("the crashed snapshot never reached the database")
			}
			if rows, _ := st.List(context.Background(), session, 10); len(rows) != 1 {
				t.Fatalf("after the retry: %d rows; want 1", len(rows))
			}
		})
	}
}

func TestHeartbeat(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir, name: "hb"})
	beats := make(chan *nats.Msg, 64)
	sub, _ := in.nc.ChanSubscribe(in.subj.Heartbeat(bus.ServiceBackup), beats)
	defer sub.Unsubscribe()
	snap := in.backupNow("manual")
	var hb bus.Heartbeat
	var d bus.BackupDetails
	testwait.For(t, 10*time.Second, "an ok heartbeat with the snapshot", func() bool {
		in.clock.Advance(bus.HeartbeatInterval)
		select {
		case m := <-beats:
			hb, d = bus.Heartbeat{}, bus.BackupDetails{}
			_ = jsonUnmarshal(m.Data, &hb)
			_ = jsonUnmarshal(hb.Details, &d)
			return hb.State == bus.StateOK && d.LastSnapshotID == snap.Snapshot.ID
		case <-time.After(50 * time.Millisecond):
			return false
		}
	})
	if hb.Service != bus.ServiceBackup || hb.Instance != "hb" || hb.Session != session || d.Database != "sqlite" ||
		!d.DatabaseOK || !d.LeaseHeld || d.LastSnapshotBytes == 0 || d.LastSnapshotAt == nil {
		t.Fatalf("heartbeat = %+v, details %+v", hb, d)
	}
}

// Guarantee 6: no secret in logs, events or replies.
func TestNoSecretsOnTheBusOrInLogs(t *testing.T) {
	const password = "pw-Sekret-4711"
	base := testdb.Postgres(t).URL
	withPW := strings.Replace(base, "postgres@", "postgres:"+password+"@", 1)
	if withPW == base {
		t.Fatalf("cannot put a password into %s", base)
	}
	key := randHex(32)
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	db := database{kind: "postgres", url: withPW}
	var logs strings.Builder
	var mu sync.Mutex
	in := start(t, db, instOpts{dataDir: dir, env: map[string]string{"SESSION_ENCRYPTION_KEY": key, "DATABASE_URL": withPW, "LOG_LEVEL": "debug"},
		logTo: func(p []byte) { mu.Lock(); logs.Write(p); mu.Unlock() }})
	var seen []string
	var smu sync.Mutex
	sub, err := in.nc.Subscribe("blacksky.>", func(m *nats.Msg) {
		smu.Lock()
		seen = append(seen, string(m.Data))
		smu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	in.backupNow("manual")
	_, _ = in.nc.Request(in.subj.BackupRequest(), []byte(`{"bad`), 5*time.Second)
	in.clock.Advance(bus.HeartbeatInterval)
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	smu.Lock()
	all := strings.Join(seen, "\n")
	smu.Unlock()
	mu.Lock()
	all += logs.String()
	mu.Unlock()
	for _, secret := range []string{password, key, strings.ToUpper(key)} {
		if strings.Contains(all, secret) {
			t.Fatalf("secret %q leaked:\n%s", secret[:4]+"…", all)
		}
	}
	if len(seen) < 3 {
		t.Fatalf("saw only %d bus messages; the test observes nothing", len(seen))
	}
}

// failingStore turns the database "down" for snapshots once down is set.
type failingStore struct {
	backup.Store
	down *atomic.Bool
}

var errDown = errors.New("database unreachable (test)")

func (f *failingStore) List(ctx context.Context, s string, limit int) ([]backup.Snapshot, error) {
	if f.down.Load() {
		return nil, errDown
	}
	return f.Store.List(ctx, s, limit)
}

func (f *failingStore) InsertSnapshot(ctx context.Context, n backup.NewSnapshot, hook backup.InTx) (int64, error) {
	if f.down.Load() {
		return 0, errDown
	}
	return f.Store.InsertSnapshot(ctx, n, hook)
}

func (f *failingStore) ReleaseLease(ctx context.Context, s, h string) error {
	if f.down.Load() {
		return errDown
	}
	return f.Store.ReleaseLease(ctx, s, h)
}

// Guarantee 3 and 4 together: the database fails before SIGTERM; the
// shutdown snapshot lands in the local fallback and the lease is left to
// expire rather than released over an older database snapshot.
func TestShutdownWithDatabaseDownWritesLocal(t *testing.T) {
	db := newDatabase(t, "postgres")
	dir := t.TempDir()
	path := newStore(t, dir, 256<<10)
	var logs syncBuf
	var down atomic.Bool
	open := func(ctx context.Context) (backup.Store, error) {
		st, err := db.open(ctx)
		if err != nil {
			return nil, err
		}
		return &failingStore{Store: st, down: &down}, nil
	}
	// On Heroku, where the dyno's disk is wiped next.
	in := start(t, db, instOpts{dataDir: dir, open: open, name: "dyno-a", env: map[string]string{"HEROKU": "true"}, logTo: logs.write})
	first := in.backupNow("manual")
	write(t, path, 3)
	down.Store(true)
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := backup.Local{Dir: dir + "/backups"}.List()
	if len(files) == 0 || files[0].SHA256 != sha256Hex(plain) || files[0].SHA256 == first.Snapshot.SHA256 {
		t.Fatalf("local fallback newest = %+v; want the final store", files)
	}
	st := db.mustOpen(t)
	if rows, _ := st.List(context.Background(), session, 10); len(rows) != 1 {
		t.Fatalf("%d rows; want only the first", len(rows))
	}
	if l, held, _ := st.AcquireLease(context.Background(), session, "next", time.Now(), time.Minute, backup.Lease{}); held || l.Holder != "dyno-a" {
		t.Fatalf("lease = %+v (next held %v); want dyno-a's, left to expire", l, held)
	}
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "SHUTDOWN SNAPSHOT NOT IN THE DATABASE") {
		t.Fatal("on Heroku, a shutdown snapshot kept on the disk only was not logged as an error")
	}
}

// syncBuf collects log lines from several goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) write(p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The lease taken by another instance at runtime: conn.standby tells the
// gateway to close its socket, database snapshots stop and requests are
// refused until the lease is ours again.
func TestLeaseLostStopsDatabaseSnapshots(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir, name: "dyno-a", leaseTTL: time.Minute})
	standby := make(chan *nats.Msg, 16)
	ssub, _ := in.nc.ChanSubscribe(in.subj.Conn(bus.ConnStandby), standby)
	defer ssub.Unsubscribe()
	// Another instance takes the lease (as if ours had expired).
	st := db.mustOpen(t)
	steal(t, st, "thief")
	var ev bus.ConnEvent
	testwait.For(t, 10*time.Second, "conn.standby after the renewal found the thief", func() bool {
		in.clock.Advance(20 * time.Second) // the renewal tick
		select {
		case m := <-standby:
			_ = jsonUnmarshal(m.Data, &ev)
			return strings.Contains(ev.Reason, "lease lost")
		case <-time.After(50 * time.Millisecond):
			return false
		}
	})
	rep := in.backupNow("manual")
	if rep.OK || !strings.Contains(rep.Error, "lease") {
		t.Fatalf("reply = %+v; want refused for the lost lease", rep)
	}
	if rows, _ := st.List(context.Background(), session, 10); len(rows) != 0 {
		t.Fatalf("rows = %+v; want none", rows)
	}
}

func TestConnStoppedTakesSnapshot(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir})
	done := make(chan *nats.Msg, 4)
	sub, _ := in.nc.ChanSubscribe(in.subj.BackupDone(), done)
	defer sub.Unsubscribe()
	if err := bus.Publish(in.nc, in.subj.Conn(bus.ConnStopped), bus.ConnEvent{Kind: bus.ConnStopped, Instance: in.unit}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-done:
		var ev bus.BackupDone
		_ = jsonUnmarshal(m.Data, &ev)
		if ev.Reason != bus.ReasonShutdown || ev.SnapshotID == 0 {
			t.Fatalf("backup.done = %s", m.Data)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("conn.stopped did not produce a snapshot")
	}
}

func (f *failingStore) AcquireLease(ctx context.Context, s, h string, now time.Time, ttl time.Duration, stale backup.Lease) (backup.Lease, bool, error) {
	if f.down.Load() {
		return backup.Lease{}, false, errDown
	}
	return f.Store.AcquireLease(ctx, s, h, now, ttl, stale)
}

// Renewals failing for longer than the TTL: the lease may now be another
// instance's, so snapshots stop claiming the database.
func TestLeaseExpiresWhileDatabaseDown(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	var down atomic.Bool
	open := func(ctx context.Context) (backup.Store, error) {
		st, err := db.open(ctx)
		if err != nil {
			return nil, err
		}
		return &failingStore{Store: st, down: &down}, nil
	}
	in := start(t, db, instOpts{dataDir: dir, open: open})
	down.Store(true)
	for range 14 {
		in.clock.Advance(5 * time.Second)
	}
	rep := in.backupNow("manual")
	if rep.OK || !strings.Contains(rep.Error, "lease") {
		t.Fatalf("reply = %+v; want refused: the lease ran out", rep)
	}
	// The snapshot still reached the local fallback.
	if files, _ := (backup.Local{Dir: dir + "/backups"}).List(); len(files) != 1 {
		t.Fatalf("local fallback: %+v; want the snapshot there", files)
	}
}

// A process whose gateway never opened the store (here: restore refused for
// the wrong key) frees the lease at exit: the next start must not wait for
// it to go stale.
func TestRefusedRestoreReleasesTheLeaseAtExit(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir, env: map[string]string{"SESSION_ENCRYPTION_KEY": randHex(32)}})
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup: %+v", rep)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	wrong := start(t, db, instOpts{name: "wrong-key", env: map[string]string{"SESSION_ENCRYPTION_KEY": randHex(32)}})
	if rep := wrong.restoreReply(time.Second); rep.OK {
		t.Fatalf("restore with the wrong key = %+v", rep)
	}
	st := db.mustOpen(t)
	if l, held, _ := st.AcquireLease(context.Background(), session, "probe", time.Now(), time.Minute, backup.Lease{}); held || l.Holder != "wrong-key" {
		t.Fatalf("lease = %+v; want held by wrong-key while it runs", l)
	}
	if err := wrong.stop(); err != nil {
		t.Fatal(err)
	}
	if l, held, err := st.AcquireLease(context.Background(), session, "next", time.Now(), time.Minute, backup.Lease{}); !held || err != nil {
		t.Fatalf("lease after the refused instance stopped = %+v, %v; want free", l, err)
	}
}

// On a shared bus, another instance's gateway stopping is not about our
// store: no snapshot for it.
func TestConnStoppedOfAnotherInstanceIgnored(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir})
	done := make(chan *nats.Msg, 4)
	sub, _ := in.nc.ChanSubscribe(in.subj.BackupDone(), done)
	defer sub.Unsubscribe()
	for _, ev := range []bus.ConnEvent{{Kind: bus.ConnStopped, Instance: "web-1-other"}, {Kind: bus.ConnStopped}} {
		if err := bus.Publish(in.nc, in.subj.Conn(bus.ConnStopped), ev); err != nil {
			t.Fatal(err)
		}
	}
	// Our own request after them: the first snapshot to finish must be its.
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup: %+v", rep)
	}
	m := <-done
	var ev bus.BackupDone
	_ = jsonUnmarshal(m.Data, &ev)
	if ev.Reason != "manual" || len(done) != 0 {
		t.Fatalf("snapshots: %s and %d more; want only the manual one", m.Data, len(done))
	}
}

// Stopped before the restore was done (the database failing the restore's
// reads): the gateway never opened the store, so the lease is freed at exit.
func TestStoppedBeforeRestoreReleasesTheLease(t *testing.T) {
	db := newDatabase(t, "sqlite")
	f := newFaults()
	f.set("List", -1, nil)
	in := start(t, db, instOpts{name: "early-stop", open: openFaulty(db, f), noWait: true})
	testwait.For(t, 10*time.Second, "the restore to fail on the database", func() bool {
		if f.count("List") >= 2 {
			return true
		}
		in.clock.Advance(time.Second)
		return false
	})
	st := db.mustOpen(t)
	if l, held, _ := st.AcquireLease(context.Background(), session, "probe", time.Now(), time.Minute, backup.Lease{}); held || l.Holder != "early-stop" {
		t.Fatalf("lease = %+v; want held by early-stop while it waits for the database", l)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	if l, held, err := st.AcquireLease(context.Background(), session, "next", time.Now(), time.Minute, backup.Lease{}); !held || err != nil {
		t.Fatalf("lease after a stop before the restore = %+v, %v; want free", l, err)
	}
}
