package backup_test

import (
	"context"
	"database/sql"
	"net/url"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// oldRelease writes the lease row as a holder of the previous release does:
// a 60 s TTL renewed every 20 s, the renewal time and expiry moved, the
// version never counted.
type oldRelease struct {
	t  *testing.T
	db *sql.DB
}

func newOldRelease(t *testing.T, db database, holder string, now time.Time) oldRelease {
	t.Helper()
	db.mustOpen(t) // migrated
	sdb, err := sql.Open("sqlite", sqlitefile.URI(db.path, url.Values{"_pragma": {"busy_timeout(10000)"}}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sdb.Close() })
	if _, err := sdb.Exec(`INSERT INTO blacksky_leases (session_id, holder, acquired_at_ms, renewed_at_ms, expires_at_ms)
		VALUES (?, ?, ?, ?, ?)`, session, holder, now.UnixMilli(), now.UnixMilli(), now.Add(time.Minute).UnixMilli()); err != nil {
		t.Fatal(err)
	}
	return oldRelease{t: t, db: sdb}
}

func (o oldRelease) renew(now time.Time) {
	o.t.Helper()
	if _, err := o.db.Exec(`UPDATE blacksky_leases SET renewed_at_ms = ?, expires_at_ms = ? WHERE session_id = ?`,
		now.UnixMilli(), now.Add(time.Minute).UnixMilli(), session); err != nil {
		o.t.Fatal(err)
	}
}

func holderOf(t *testing.T, st backup.Store) string {
	t.Helper()
	l, _, err := st.AcquireLease(context.Background(), session, "peek-"+randHex(2), time.Unix(0, 0), time.Second, backup.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	return l.Holder
}

// A standby watches for the holder's own advertised TTL (expires - renewed,
// on the holder's one clock), not only its own 10 s: a holder of the
// previous release (60 s TTL, renewed every 20 s, version never counted)
// keeps its lease for as long as it renews, and loses it 60 s after it
// stops.
func TestStandbyWatchesForTheHoldersAdvertisedTTL(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	clock := clockwork.NewFakeClock()
	old := newOldRelease(t, db, "old-release", clock.Now())
	b := start(t, db, instOpts{name: "dyno-b", noWait: true, clock: clock})

	begin, lastRenewal := clock.Now(), clock.Now()
	var longest int64
	testwait.For(t, 60*time.Second, "130 s of fake time with the old release renewing", func() bool {
		clock.Advance(250 * time.Millisecond)
		if clock.Since(lastRenewal) >= 20*time.Second {
			lastRenewal = clock.Now()
			old.renew(lastRenewal)
		}
		if _, d := b.svc.Status(); d.LeaseHeld {
			t.Fatalf("dyno-b took a lease renewed every 20 s with a 60 s TTL, at +%s", clock.Since(begin))
		} else if d.LeaseHolder == "old-release" {
			longest = max(longest, d.LeaseWatchMS)
		}
		return clock.Since(begin) >= 130*time.Second
	})
	if longest < 15000 {
		t.Fatalf("dyno-b watched the row unchanged for at most %d ms; want past its own 10 s TTL", longest)
	}
	if h := holderOf(t, st); h != "old-release" {
		t.Fatalf("lease holder = %q; want old-release", h)
	}

	// The old release stops renewing: taken after 60 s of watching.
	stoppedAt := lastRenewal
	testwait.For(t, 60*time.Second, "dyno-b to take the lease", func() bool {
		if _, d := b.svc.Status(); d.LeaseHeld {
			return true
		}
		clock.Advance(250 * time.Millisecond)
		return false
	})
	took := clock.Since(stoppedAt)
	if took < time.Minute || took > time.Minute+5*time.Second {
		t.Fatalf("dyno-b took the lease %s after the last renewal; want 60 s and a little", took)
	}
	t.Logf("taken %s after the last renewal", took)
}

// The row of `blacksky restore --force` advertises its 10 minute TTL: a
// standby does not take it after its own 10 s, while the restore writes.
func TestStandbyDoesNotTakeARestoresRowAfterItsOwnTTL(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	clock := clockwork.NewFakeClock()
	if _, ok, err := st.AcquireLease(context.Background(), session, "restore-cli:op", clock.Now(), 10*time.Minute, backup.Lease{}); !ok || err != nil {
		t.Fatalf("seed lease: %v %v", ok, err)
	}
	b := start(t, db, instOpts{name: "dyno-b", noWait: true, clock: clock})
	begin := clock.Now()
	var longest int64
	testwait.For(t, 30*time.Second, "30 s of fake time", func() bool {
		clock.Advance(250 * time.Millisecond)
		_, d := b.svc.Status()
		if d.LeaseHeld {
			t.Fatalf("dyno-b took the restore's lease at +%s", clock.Since(begin))
		}
		longest = max(longest, d.LeaseWatchMS)
		return clock.Since(begin) >= 30*time.Second
	})
	if longest < 15000 {
		t.Fatalf("dyno-b watched at most %d ms; want past its own 10 s TTL", longest)
	}
	if h := holderOf(t, st); h != "restore-cli:op" {
		t.Fatalf("lease holder = %q", h)
	}
}

// gatedStore holds AcquireLease calls while the gate is shut, telling the
// test each time one waits.
type gatedStore struct {
	backup.Store
	mu      sync.Mutex
	shut    bool
	entered chan struct{}
	open    chan struct{}
}

func (g *gatedStore) AcquireLease(ctx context.Context, session, holder string, now time.Time, ttl time.Duration, stale backup.Lease) (backup.Lease, bool, error) {
	g.mu.Lock()
	shut := g.shut
	g.mu.Unlock()
	if shut {
		g.entered <- struct{}{}
		<-g.open
	}
	return g.Store.AcquireLease(ctx, session, holder, now, ttl, stale)
}

// A read that itself takes longer than the watch's gap bound (here 9.5 s)
// counts for nothing: the holder may have been kept from renewing for all
// that time. The watch starts over from its answer instead of taking the
// row at the next read.
func TestSlowStandbyReadStartsTheWatchOver(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	clock := clockwork.NewFakeClock()
	if _, ok, err := st.AcquireLease(context.Background(), session, "quiet-holder", clock.Now(), backup.DefaultLeaseTTL, backup.Lease{}); !ok || err != nil {
		t.Fatalf("seed lease: %v %v", ok, err)
	}
	g := &gatedStore{entered: make(chan struct{}), open: make(chan struct{})}
	open := func(ctx context.Context) (backup.Store, error) {
		s, err := db.open(ctx)
		g.Store = s
		return g, err
	}
	b := start(t, db, instOpts{name: "dyno-b", noWait: true, clock: clock, open: open})
	testwait.For(t, 10*time.Second, "dyno-b watching for a second", func() bool {
		clock.Advance(100 * time.Millisecond)
		_, d := b.svc.Status()
		return d.LeaseHolder == "quiet-holder" && d.LeaseWatchMS >= 1000
	})
	g.mu.Lock()
	g.shut = true
	g.mu.Unlock()
	// The next read waits in the gate while 9.5 s pass.
	testwait.For(t, 10*time.Second, "a read in the gate", func() bool {
		select {
		case <-g.entered:
			return true
		default:
			clock.Advance(100 * time.Millisecond)
			return false
		}
	})
	clock.Advance(9500 * time.Millisecond)
	g.mu.Lock()
	g.shut = false
	g.mu.Unlock()
	close(g.open)
	var after int64
	testwait.For(t, 10*time.Second, "the slow read's answer", func() bool {
		_, d := b.svc.Status()
		after = d.LeaseWatchMS
		return d.LeaseHeld || after == 0 || after >= 9000
	})
	if after != 0 {
		t.Fatalf("after a read that took 9.5 s the watch counts %d ms; want it started over", after)
	}
	// Quick reads for a while: far from a whole TTL since the slow one.
	testwait.For(t, 10*time.Second, "two seconds of quick reads", func() bool {
		_, d := b.svc.Status()
		if d.LeaseHeld {
			t.Fatal("dyno-b took the lease right after a read that took 9.5 s")
		}
		if d.LeaseWatchMS >= 2000 {
			return true
		}
		clock.Advance(100 * time.Millisecond)
		return false
	})
	if h := holderOf(t, st); h != "quiet-holder" {
		t.Fatalf("lease holder = %q right after a slow read", h)
	}
	// A whole TTL of quick reads after it: now it takes it.
	testwait.For(t, 20*time.Second, "dyno-b to take the lease", func() bool {
		clock.Advance(250 * time.Millisecond)
		_, d := b.svc.Status()
		return d.LeaseHeld
	})
}

// sessionSHA is the sha256 of a session store as a snapshot records it.
func sessionSHA(t *testing.T, path string) string {
	t.Helper()
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256Hex(plain)
}

// A standby that takes the session over from another instance restores what
// that instance left in the database, even when its own disk (a reused
// compose or VPS volume) holds a valid linked store: that store is older.
// Only the very store of the newest snapshot stays.
func TestTakeoverRestoresTheOtherHoldersStoreOverAnOlderOneOnDisk(t *testing.T) {
	for _, same := range []bool{false, true} {
		name := "older store on disk"
		if same {
			name = "newest snapshot's store on disk"
		}
		t.Run(name, func(t *testing.T) {
			db := newDatabase(t, "sqlite")
			clock := clockwork.NewFakeClock()
			dirA, dirB := t.TempDir(), t.TempDir()
			pathA := newStore(t, dirA, 128<<10)
			var pathB string
			if same {
				if err := snapshot.WriteFileAtomic(filepath.Join(dirB, "session.db"), mustRead(t, pathA), 0o600); err != nil {
					t.Fatal(err)
				}
				pathB = filepath.Join(dirB, "session.db")
			} else {
				pathB = newStore(t, dirB, 128<<10) // dyno-b's own, from an earlier run
			}
			a := start(t, db, instOpts{dataDir: dirA, name: "dyno-a", clock: clock})
			if !same {
				write(t, pathA, 5)
			}
			b := start(t, db, instOpts{dataDir: dirB, name: "dyno-b", noWait: true, clock: clock})
			testwait.For(t, 10*time.Second, "dyno-b in standby", func() bool {
				clock.Advance(100 * time.Millisecond)
				st, _ := b.svc.Status()
				return st == bus.StateStandby
			})
			if err := a.stop(); err != nil { // shutdown snapshot, then release
				t.Fatal(err)
			}
			newest := mustList(t, db)[0]
			rep := b.advanceUntilAnswer(100 * time.Millisecond)
			if !rep.OK {
				t.Fatalf("dyno-b restore = %+v", rep)
			}
			if got := sessionSHA(t, pathB); got != newest.SHA256 {
				t.Fatalf("dyno-b's store after the takeover is not dyno-a's last snapshot (reply %+v)", rep)
			}
			if same && rep.Restored {
				t.Fatalf("dyno-b restored although its store is the newest snapshot's: %+v", rep)
			}
			if !same && (!rep.Restored || rep.Source != bus.SourceDatabase || rep.SnapshotID != newest.ID) {
				t.Fatalf("dyno-b restore = %+v; want snapshot %d from the database", rep, newest.ID)
			}
		})
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	return plain
}
