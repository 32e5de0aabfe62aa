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

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// faults injects database failures into every faultStore that shares it: per
// operation, a number of failures (-1: until changed) with an error, or a
// hang until the call's context ends.
type faults struct {
	mu    sync.Mutex
	fail  map[string]int
	errs  map[string]error
	hang  map[string]bool
	calls map[string]int
}

func newFaults() *faults {
	return &faults{fail: map[string]int{}, errs: map[string]error{}, hang: map[string]bool{}, calls: map[string]int{}}
}

func (f *faults) set(op string, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		err = errDown
	}
	f.fail[op], f.errs[op] = n, err
}

func (f *faults) setHang(op string, hang bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hang[op] = hang
}

func (f *faults) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *faults) check(ctx context.Context, op string) error {
	f.mu.Lock()
	f.calls[op]++
	n, err, hang := f.fail[op], f.errs[op], f.hang[op]
	if n > 0 {
		f.fail[op] = n - 1
	}
	f.mu.Unlock()
	if hang {
		<-ctx.Done()
		return ctx.Err()
	}
	if n != 0 {
		return err
	}
	return nil
}

type faultStore struct {
	backup.Store
	f *faults
}

func (s *faultStore) List(ctx context.Context, session string, limit int) ([]backup.Snapshot, error) {
	if err := s.f.check(ctx, "List"); err != nil {
		return nil, err
	}
	return s.Store.List(ctx, session, limit)
}

func (s *faultStore) Payload(ctx context.Context, id int64) ([]byte, error) {
	if err := s.f.check(ctx, "Payload"); err != nil {
		return nil, err
	}
	return s.Store.Payload(ctx, id)
}

func (s *faultStore) AcquireLease(ctx context.Context, session, holder string, now time.Time, ttl time.Duration, stale backup.Lease) (backup.Lease, bool, error) {
	if err := s.f.check(ctx, "AcquireLease"); err != nil {
		return backup.Lease{}, false, err
	}
	return s.Store.AcquireLease(ctx, session, holder, now, ttl, stale)
}

func (s *faultStore) ReleaseLease(ctx context.Context, session, holder string) error {
	if err := s.f.check(ctx, "ReleaseLease"); err != nil {
		return err
	}
	return s.Store.ReleaseLease(ctx, session, holder)
}

func (s *faultStore) InsertSnapshot(ctx context.Context, n backup.NewSnapshot, hook backup.InTx) (int64, error) {
	if err := s.f.check(ctx, "InsertSnapshot"); err != nil {
		return 0, err
	}
	return s.Store.InsertSnapshot(ctx, n, hook)
}

// openFaulty opens db wrapped in a faultStore driven by f.
func openFaulty(db database, f *faults) func(context.Context) (backup.Store, error) {
	return func(ctx context.Context) (backup.Store, error) {
		st, err := db.open(ctx)
		if err != nil {
			return nil, err
		}
		return &faultStore{Store: st, f: f}, nil
	}
}

// seedTwo stores two different snapshots of one session and returns their
// ids, older first.
func seedTwo(t *testing.T, db database) (older, newer bus.SnapshotRef) {
	t.Helper()
	dir := t.TempDir()
	path := newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir})
	a := in.backupNow("manual")
	write(t, path, 2)
	b := in.backupNow("manual")
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	if !a.OK || !b.OK || a.Snapshot.ID == b.Snapshot.ID {
		t.Fatalf("seed: %+v %+v", a, b)
	}
	return *a.Snapshot, *b.Snapshot
}

// noAnswer asserts that P.session.restore is not answered within d.
func (in *instance) noAnswer(d time.Duration, why string) {
	in.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var rep bus.RestoreReply
	if err := bus.Request(ctx, in.nc, in.subj.SessionRestoreFor(in.unit), struct{}{}, &rep); err == nil {
		in.t.Fatalf("%s: answered %+v; want no answer (%s)", in.name, rep, why)
	}
}

// advanceUntilAnswer advances the clock by step until P.session.restore is
// answered.
func (in *instance) advanceUntilAnswer(step time.Duration) bus.RestoreReply {
	in.t.Helper()
	var rep bus.RestoreReply
	testwait.For(in.t, 20*time.Second, "a session.restore answer", func() bool {
		in.clock.Advance(step)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return bus.Request(ctx, in.nc, in.subj.SessionRestoreFor(in.unit), struct{}{}, &rep) == nil
	})
	return rep
}

// Finding 1: only a snapshot that does not verify (or is gone) is skipped; a
// database failure stops the restore instead of falling back to an older,
// stale snapshot.
func TestRestoreStopsOnDatabaseError(t *testing.T) {
	db := newDatabase(t, "sqlite")
	older, newer := seedTwo(t, db)
	tests := []struct {
		name    string
		op      string
		err     error
		wantErr bool
		wantID  int64
	}{
		{"payload connection reset", "Payload", errors.New("read: connection reset by peer"), true, 0},
		{"payload timeout", "Payload", context.DeadlineExceeded, true, 0},
		{"list fails", "List", errDown, true, 0},
		{"newest deleted meanwhile", "Payload", backup.ErrNotFound, false, older.ID},
		{"no fault", "", nil, false, newer.ID},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFaults()
			if tc.op != "" {
				f.set(tc.op, 1, tc.err)
			}
			st := &faultStore{Store: db.mustOpen(t), f: f}
			dir := t.TempDir()
			r := &backup.Restorer{Store: st, Session: session, SessionPath: dir + "/session.db",
				Local: backup.Local{Dir: dir + "/backups"}, TmpDir: dir, Log: discard()}
			res, err := r.Restore(context.Background(), 0)
			if tc.wantErr {
				if err == nil || !backup.IsDBError(err) {
					t.Fatalf("restore = %+v, %v; want a database error", res, err)
				}
				if _, serr := os.Stat(r.SessionPath); !os.IsNotExist(serr) {
					t.Fatalf("a store was written after a database error: %v", serr)
				}
				return
			}
			if err != nil || !res.Restored || res.SnapshotID != tc.wantID {
				t.Fatalf("restore = %+v, %v; want snapshot %d", res, err, tc.wantID)
			}
		})
	}
}

// Finding 1: a database failure during restore on start, with an empty
// disk, is retried; the gateway gets no answer until the real session is
// restored, never "nothing to restore".
func TestRestoreOnStartRetriesDatabase(t *testing.T) {
	tests := []struct {
		name string
		op   string
	}{
		{"list fails", "List"},
		{"payload fails", "Payload"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			db := newDatabase(t, "sqlite")
			_, newer := seedTwo(t, db)
			f := newFaults()
			f.set(tc.op, 3, nil)
			in := start(t, db, instOpts{open: openFaulty(db, f), dbWait: time.Second, noWait: true})
			testwait.For(t, 10*time.Second, "the first failed "+tc.op, func() bool { return f.count(tc.op) >= 1 })
			in.noAnswer(300*time.Millisecond, "the database failed mid-restore and the disk is empty")
			rep := in.advanceUntilAnswer(time.Second)
			if !rep.OK || !rep.Restored || rep.Source != bus.SourceDatabase || rep.SnapshotID != newer.ID {
				t.Fatalf("restore = %+v; want snapshot %d from the database", rep, newer.ID)
			}
		})
	}
}

// Finding 2: a database error while in standby keeps the instance in
// standby (another instance holds the lease); it goes live only once the
// lease is its own.
func TestStandbySurvivesDatabaseErrors(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	if _, ok, err := st.AcquireLease(context.Background(), session, "dyno-a", clockStart(), time.Hour, backup.Lease{}); !ok || err != nil {
		t.Fatalf("seed lease: %v %v", ok, err)
	}
	dir := t.TempDir()
	newStore(t, dir, 128<<10) // local state: the old code went live on it
	f := newFaults()
	in := start(t, db, instOpts{dataDir: dir, open: openFaulty(db, f), dbWait: time.Second, noWait: true, name: "dyno-b"})
	// The first attempt answered: dyno-b has seen dyno-a's lease.
	testwait.For(t, 10*time.Second, "the first lease attempt", func() bool {
		_, d := in.svc.Status()
		return d.LeaseHolder == "dyno-a"
	})
	f.set("AcquireLease", -1, nil)
	// Every attempt fails: standby must keep retrying, not give up and go live.
	retried := f.count("AcquireLease") + 10
	testwait.For(t, 10*time.Second, "ten more failed lease attempts", func() bool {
		in.clock.Advance(10 * time.Second)
		return f.count("AcquireLease") >= retried
	})
	in.noAnswer(300*time.Millisecond, "dyno-a still holds the lease")
	f.set("AcquireLease", 0, nil)
	if err := st.ReleaseLease(context.Background(), session, "dyno-a"); err != nil {
		t.Fatal(err)
	}
	if rep := in.advanceUntilAnswer(time.Second); !rep.OK {
		t.Fatalf("restore = %+v", rep)
	}
	if l, held, _ := st.AcquireLease(context.Background(), session, "probe", clockStart(), time.Minute, backup.Lease{}); held || l.Holder != "dyno-b" {
		t.Fatalf("lease = %+v; want dyno-b's", l)
	}
}

// Finding 3: the lease lost at runtime, then ours again: the store the
// other instance left in the database is restored before P.session.restore
// is answered again.
func TestLeaseLostThenRegainedRestoresNewest(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	in := start(t, db, instOpts{dataDir: dir, name: "dyno-a", leaseTTL: time.Minute, retry: 10 * time.Second})
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup: %+v", rep)
	}
	standby := make(chan *nats.Msg, 16)
	ssub, _ := in.nc.ChanSubscribe(in.subj.Conn(bus.ConnStandby), standby)
	defer ssub.Unsubscribe()
	st := db.mustOpen(t)
	steal(t, st, "thief")
	testwait.For(t, 10*time.Second, "conn.standby", func() bool {
		in.clock.Advance(20 * time.Second)
		select {
		case <-standby:
			return true
		case <-time.After(50 * time.Millisecond):
			return false
		}
	})
	// The thief uses the session and leaves a newer store in the database.
	other := t.TempDir()
	opath := newStore(t, other, 128<<10)
	write(t, opath, 5)
	plain, err := snapshot.ReadConsistent(context.Background(), opath)
	if err != nil {
		t.Fatal(err)
	}
	payload, meta, err := snapshot.Encode(plain, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := st.InsertSnapshot(context.Background(), backup.NewSnapshot{SessionID: session, CreatedAt: clockStart(), Reason: "shutdown",
		SHA256: sha256Hex(plain), SizeBytes: meta.Size, StoredBytes: meta.Stored, Format: meta.Format, Payload: payload}, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.noAnswer(300*time.Millisecond, "standby: the thief holds the lease")
	if err := st.ReleaseLease(context.Background(), session, "thief"); err != nil {
		t.Fatal(err)
	}
	rep := in.advanceUntilAnswer(5 * time.Second)
	if !rep.OK || !rep.Restored || rep.SnapshotID != id {
		t.Fatalf("restore = %+v; want the thief's snapshot %d", rep, id)
	}
	got, err := snapshot.ReadConsistent(context.Background(), in.sessionPath())
	if err != nil || sha256Hex(got) != sha256Hex(plain) {
		t.Fatalf("session store is not the thief's last one: %v", err)
	}
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup after regaining the lease: %+v", rep)
	}
}

// Finding 4: a snapshot job hung in a database call does not keep the
// shutdown snapshot from the local fallback.
func TestHungInsertDoesNotBlockShutdownSnapshot(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	path := newStore(t, dir, 128<<10)
	f := newFaults()
	in := start(t, db, instOpts{dataDir: dir, open: openFaulty(db, f)})
	f.setHang("InsertSnapshot", true)
	write(t, path, 2)
	if err := bus.Publish(in.nc, in.subj.BackupRequest(), bus.BackupRequest{Reason: "manual"}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the job hung in its insert", func() bool { return f.count("InsertSnapshot") >= 1 })
	write(t, path, 3)
	in.cancel()
	// Shutdown gives up on the hung job after 55% of its budget (70% of
	// SHUTDOWN_TIMEOUT) and writes the local fallback in real time, still
	// under that budget. Move the clock past the first mark but never past
	// the second until the file is there; then let it run so River stops.
	shutdownFile := func() bool {
		files, _ := backup.Local{Dir: dir + "/backups"}.List()
		return len(files) > 0 && files[0].Reason == bus.ReasonShutdown
	}
	limit := in.cfg.ShutdownTimeout * 6 / 10
	var advanced time.Duration
	testwait.For(t, 20*time.Second, "the shutdown snapshot in the local fallback", func() bool {
		if shutdownFile() {
			return true
		}
		if advanced < limit {
			in.clock.Advance(100 * time.Millisecond)
			advanced += 100 * time.Millisecond
		}
		return false
	})
	testwait.For(t, 20*time.Second, "Run to return", func() bool {
		select {
		case err := <-in.done:
			in.done <- err
			return true
		default:
			in.clock.Advance(time.Second)
			return false
		}
	})
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	files, _ := backup.Local{Dir: dir + "/backups"}.List()
	if len(files) == 0 || files[0].SHA256 != sha256Hex(plain) || files[0].Reason != bus.ReasonShutdown {
		t.Fatalf("local fallback newest = %+v; want the final store as a shutdown snapshot", files)
	}
}

// Finding 5: while the database is down, scheduled snapshots go to the
// local fallback; once it is back, the database catches up at once.
func TestScheduledSnapshotsWhileDatabaseDown(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	path := newStore(t, dir, 128<<10)
	var up atomic.Bool
	open := func(ctx context.Context) (backup.Store, error) {
		if !up.Load() {
			return nil, errors.New("connection refused")
		}
		return db.open(ctx)
	}
	in := start(t, db, instOpts{dataDir: dir, open: open, dbWait: time.Second, noWait: true})
	if rep := in.advanceUntilAnswer(time.Second); !rep.OK {
		t.Fatalf("restore = %+v", rep)
	}
	write(t, path, 2)
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256Hex(plain)
	testwait.For(t, 30*time.Second, "a scheduled local snapshot", func() bool {
		in.clock.Advance(time.Minute)
		files, _ := backup.Local{Dir: dir + "/backups"}.List()
		return len(files) > 0 && files[0].SHA256 == want && files[0].Reason == bus.ReasonScheduled
	})
	st := db.mustOpen(t) // migrated before the service reconnects: not concurrently
	up.Store(true)
	// The reconnect waits on the fake clock, but the catch-up snapshot then
	// runs real SQL under fake-clock call timeouts (10 s): move the clock
	// 1 s per 20 ms poll, so such a timeout spans 200 ms of real time.
	testwait.Every(t, 20*time.Second, 20*time.Millisecond, "the database to catch up", func() bool {
		in.clock.Advance(time.Second)
		rows, _ := st.List(context.Background(), session, 10)
		return len(rows) > 0 && rows[0].SHA256 == want
	})
}

// Finding 6: a renewal that hangs (blackholed database) times out after
// TTL/3 and the heartbeat says degraded.
func TestHungRenewalDegrades(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	f := newFaults()
	in := start(t, db, instOpts{dataDir: dir, open: openFaulty(db, f), leaseTTL: time.Minute})
	beats := make(chan *nats.Msg, 64)
	sub, _ := in.nc.ChanSubscribe(in.subj.Heartbeat(bus.ServiceBackup), beats)
	defer sub.Unsubscribe()
	f.setHang("AcquireLease", true)
	testwait.For(t, 10*time.Second, "a degraded heartbeat", func() bool {
		in.clock.Advance(bus.HeartbeatInterval)
		select {
		case m := <-beats:
			var hb bus.Heartbeat
			var d bus.BackupDetails
			_ = jsonUnmarshal(m.Data, &hb)
			_ = jsonUnmarshal(hb.Details, &d)
			return hb.State == bus.StateDegraded && !d.DatabaseOK
		case <-time.After(50 * time.Millisecond):
			return false
		}
	})
	f.setHang("AcquireLease", false)
}

// Finding 7: a hung lease release cannot stretch the shutdown past its one
// deadline (70% of SHUTDOWN_TIMEOUT).
func TestShutdownKeepsOneDeadline(t *testing.T) {
	db := newDatabase(t, "sqlite")
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	f := newFaults()
	in := start(t, db, instOpts{dataDir: dir, open: openFaulty(db, f)})
	f.setHang("ReleaseLease", true)
	in.cancel()
	budget := in.cfg.ShutdownTimeout * 7 / 10
	var advanced time.Duration
	// A real bound, well under the old 5 s release timeout; the fake clock
	// is moved on (up to twice the budget) while Run works.
	testwait.For(t, 3*time.Second, "Run to return within its shutdown budget", func() bool {
		select {
		case err := <-in.done:
			in.done <- err
			return true
		default:
		}
		if advanced < 2*budget {
			in.clock.Advance(100 * time.Millisecond)
			advanced += 100 * time.Millisecond
		}
		return false
	})
	if advanced > budget+time.Second {
		t.Fatalf("Run returned only after %s of the clock; budget %s", advanced, budget)
	}
}

// Nit: with SESSION_ENCRYPTION_KEY set, a plaintext snapshot is refused
// (skipped) unless ALLOW_PLAINTEXT_BACKUPS.
func TestPlaintextSnapshotRefusedWithKey(t *testing.T) {
	dir := t.TempDir()
	path := newStore(t, dir, 128<<10)
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	payload, _, err := snapshot.Encode(plain, nil)
	if err != nil {
		t.Fatal(err)
	}
	key := []byte(strings.Repeat("k", 32))
	tests := []struct {
		name         string
		allow        bool
		wantRestored bool
	}{
		{"refused", false, false},
		{"allowed", true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			to := t.TempDir()
			l := backup.Local{Dir: to + "/backups"}
			if _, err := l.Write(payload, time.Now(), "manual", sha256Hex(plain)); err != nil {
				t.Fatal(err)
			}
			r := &backup.Restorer{Session: session, SessionPath: to + "/session.db", Local: l, TmpDir: to, Key: key,
				AllowPlaintext: tc.allow, Log: discard()}
			res, err := r.Restore(context.Background(), 0)
			if err != nil || res.Restored != tc.wantRestored {
				t.Fatalf("restore = %+v, %v; want restored %v", res, err, tc.wantRestored)
			}
		})
	}
}

// Nit: database snapshots are tried in insert order (id), not by created_at,
// which comes from whichever instance's clock wrote the row.
func TestRestoreOrdersDatabaseRowsByID(t *testing.T) {
	db := newDatabase(t, "sqlite")
	_, newer := seedTwo(t, db)
	st := db.mustOpen(t)
	p, err := st.Payload(context.Background(), newer.ID)
	if err != nil {
		t.Fatal(err)
	}
	meta, err := snapshot.PeekMeta(p)
	if err != nil {
		t.Fatal(err)
	}
	// The newest row, written by an instance whose clock is far behind.
	id, err := st.InsertSnapshot(context.Background(), backup.NewSnapshot{SessionID: session, CreatedAt: time.Unix(0, 0),
		Reason: "shutdown", SHA256: newer.SHA256, SizeBytes: meta.Size, StoredBytes: int64(len(p)), Format: meta.Format, Payload: p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, res := restoreInto(t, st, nil); res.SnapshotID != id {
		t.Fatalf("restored %d; want the last inserted row %d", res.SnapshotID, id)
	}
}
