package backup_test

import (
	"context"
	"math/rand/v2"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testproxy"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// proxied is a test PostgreSQL reached through a proxy the test can cut
// (the database "stops" for the services, not for other tests), and the
// same database reached directly, to look at it meanwhile.
type proxied struct {
	via    database
	direct database
	proxy  *testproxy.Proxy
}

func proxiedPostgres(t *testing.T) proxied {
	t.Helper()
	pg := testdb.Postgres(t)
	u, err := url.Parse(pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	p := testproxy.Start(t, u.Host)
	u.Host = p.Addr()
	return proxied{via: database{kind: "postgres", url: u.String()}, direct: database{kind: "postgres", url: pg.URL}, proxy: p}
}

// leaseRow reads the session's lease row directly (holder "" when none).
func leaseRow(t *testing.T, db database) (holder string, version int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, db.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	err = conn.QueryRow(ctx, `SELECT holder, version FROM blacksky_leases WHERE session_id = $1`, session).Scan(&holder, &version)
	if err == pgx.ErrNoRows {
		return "", 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return holder, version
}

// The lease rule's race: during a preboot overlap the database goes away
// for 20-40 s while the holder keeps writing. The standby, which cannot read
// the lease row meanwhile, must not take the session when the database
// returns: the holder's first renewal wins, the holder's local-only snapshot
// reaches the database, and the standby takes over only at the holder's
// clean stop, with every write.
// Both with their own bus (the embedded NATS of each dyno), and with one
// shared bus (an external NATS_URL), where the holder hears the standby's
// heartbeats: a standby that cannot reach the database either is no reason
// to fence.
func TestDatabaseOutageDuringOverlapKeepsTheHolder(t *testing.T) {
	t.Run("own buses", func(t *testing.T) { testOutageDuringOverlap(t, false) })
	t.Run("shared bus", func(t *testing.T) { testOutageDuringOverlap(t, true) })
}

func testOutageDuringOverlap(t *testing.T, sharedBus bool) {
	db := proxiedPostgres(t)
	clock := clockwork.NewFakeClock() // one time for both dynos, as in life
	var shared *bus.Server
	if sharedBus {
		var err error
		if shared, err = bus.StartServer(bus.ServerOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(shared.Shutdown)
	}
	dirA := t.TempDir()
	path := newStore(t, dirA, 128<<10)
	a := start(t, db.via, instOpts{dataDir: dirA, name: "dyno-a", clock: clock, bus: shared})
	if rep := a.backupNow("manual"); !rep.OK || rep.Stored != bus.StoredDatabase {
		t.Fatalf("backup before the outage = %+v", rep)
	}
	fenced := make(chan *nats.Msg, 16)
	fsub, _ := a.nc.ChanSubscribe(a.subj.Conn(bus.ConnStandby), fenced)
	defer fsub.Unsubscribe()

	b := start(t, db.via, instOpts{name: "dyno-b", noWait: true, clock: clock, bus: shared})
	testwait.For(t, 10*time.Second, "dyno-b in standby", func() bool {
		clock.Advance(250 * time.Millisecond)
		st, _ := b.svc.Status()
		return st == bus.StateStandby
	})

	db.proxy.Down()
	outage := 20*time.Second + rand.N(20*time.Second)
	t.Logf("database down for %s", outage)
	last := write(t, path, 5)
	rep := a.backupNow("manual")
	if !rep.OK || rep.Stored != bus.StoredLocal {
		t.Fatalf("backup during the outage = %+v; want ok, stored local", rep)
	}
	localSHA := rep.Snapshot.SHA256
	// Health follows the failed call at once, not at the next renewal.
	if st, d := a.svc.Status(); st != bus.StateDegraded || d.DatabaseOK {
		t.Fatalf("dyno-a after a failed database call: %s, database ok %v; want degraded", st, d.DatabaseOK)
	}
	for elapsed := time.Duration(0); elapsed < outage; elapsed += 500 * time.Millisecond {
		clock.Advance(500 * time.Millisecond)
		if dbOK(a) && elapsed > 2*time.Second {
			t.Fatal("dyno-a reports the database ok while it is down")
		}
	}
	testwait.For(t, 10*time.Second, "both to see the outage", func() bool {
		clock.Advance(100 * time.Millisecond)
		return !dbOK(a) && !dbOK(b)
	})
	_, before := leaseRow(t, db.direct)

	db.proxy.Up()
	// The holder's renewal comes first.
	testwait.For(t, 20*time.Second, "dyno-a's first renewal after the outage", func() bool {
		clock.Advance(250 * time.Millisecond)
		holder, v := leaseRow(t, db.direct)
		if holder != "dyno-a" {
			t.Fatalf("lease holder %q right after the outage; want dyno-a", holder)
		}
		return v > before
	})
	testwait.For(t, 10*time.Second, "dyno-a ok again", func() bool {
		clock.Advance(100 * time.Millisecond)
		st, d := a.svc.Status()
		return st == bus.StateOK && d.DatabaseOK
	})
	// Three TTLs of both running: the standby keeps watching a live row.
	for range 3 * int(backup.DefaultLeaseTTL/(500*time.Millisecond)) {
		clock.Advance(500 * time.Millisecond)
		if holder, _ := leaseRow(t, db.direct); holder != "dyno-a" {
			t.Fatalf("lease taken by %q while dyno-a is alive", holder)
		}
	}
	if st, _ := b.svc.Status(); st != bus.StateStandby || !dbOK(b) {
		t.Fatalf("dyno-b: state %s, database ok %v; want standby, true", st, dbOK(b))
	}
	for len(fenced) > 0 {
		var ev bus.ConnEvent
		_ = jsonUnmarshal((<-fenced).Data, &ev)
		if ev.Instance == a.unit {
			t.Fatal("dyno-a told its gateway to close the socket: nobody could take the lease during the outage")
		}
	}
	testwait.For(t, 10*time.Second, "the local-only snapshot in the database", func() bool {
		clock.Advance(250 * time.Millisecond)
		for _, r := range mustList(t, db.direct) {
			if r.SHA256 == localSHA {
				return true
			}
		}
		return false
	})

	// Preboot ends: dyno-a stops cleanly; dyno-b takes over at once.
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	releasedAt := clock.Now()
	testwait.For(t, 10*time.Second, "dyno-b to take the lease", func() bool {
		if holder, _ := leaseRow(t, db.direct); holder == "dyno-b" {
			return true
		}
		clock.Advance(100 * time.Millisecond)
		return false
	})
	if took := clock.Since(releasedAt); took > time.Second {
		t.Errorf("dyno-b took the lease %s after the release; want within 1 s", took)
	}
	rep2 := b.advanceUntilAnswer(100 * time.Millisecond)
	if !rep2.OK || !rep2.Restored || rep2.Source != bus.SourceDatabase {
		t.Fatalf("dyno-b restore = %+v", rep2)
	}
	if _, maxN, err := wastore.Writes(context.Background(), b.sessionPath()); err != nil || maxN != last {
		t.Fatalf("dyno-b restored writes up to %d (%v); dyno-a's last was %d", maxN, err, last)
	}
}

func mustList(t *testing.T, db database) []backup.Snapshot {
	t.Helper()
	st := db.mustOpen(t)
	list, err := st.List(context.Background(), session, 100)
	if err != nil {
		t.Fatal(err)
	}
	return list
}

func dbOK(in *instance) bool {
	_, d := in.svc.Status()
	return d.DatabaseOK
}

// The holder's half of the rule: cut off from a database that a standby on
// the same bus still reaches, the holder fences itself (conn.standby for its
// own instance: its gateway closes the socket) before the standby, which
// waits a whole TTL of watching the row unchanged, takes the lease.
func TestHolderCutOffFencesBeforeTheStandbyTakesOver(t *testing.T) {
	pg := database{kind: "postgres", url: testdb.Postgres(t).URL}
	clock := clockwork.NewFakeClock()
	shared, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(shared.Shutdown)
	dirA := t.TempDir()
	newStore(t, dirA, 128<<10)
	cut := newFaults()
	a := start(t, pg, instOpts{dataDir: dirA, name: "dyno-a", clock: clock, bus: shared, open: openFaulty(pg, cut)})
	standby := make(chan *nats.Msg, 64)
	ssub, _ := a.nc.ChanSubscribe(a.subj.Conn(bus.ConnStandby), standby)
	defer ssub.Unsubscribe()
	b := start(t, pg, instOpts{name: "dyno-b", noWait: true, clock: clock, bus: shared})
	testwait.For(t, 10*time.Second, "dyno-b in standby", func() bool {
		clock.Advance(250 * time.Millisecond)
		st, _ := b.svc.Status()
		return st == bus.StateStandby
	})
	drain := func() (own bool) {
		for {
			select {
			case m := <-standby:
				var ev bus.ConnEvent
				_ = jsonUnmarshal(m.Data, &ev)
				own = own || ev.Instance == a.unit
			default:
				return own
			}
		}
	}
	drain()

	for _, op := range []string{"AcquireLease", "List", "Payload", "InsertSnapshot", "ReleaseLease"} {
		cut.set(op, -1, nil)
	}
	cutAt := clock.Now()
	var fencedAt time.Time
	testwait.For(t, 30*time.Second, "dyno-b to take the lease", func() bool {
		clock.Advance(250 * time.Millisecond)
		if fencedAt.IsZero() && drain() {
			fencedAt = clock.Now()
		}
		holder, _ := leaseRow(t, pg)
		return holder == "dyno-b"
	})
	tookAt := clock.Now()
	if fencedAt.IsZero() {
		t.Fatal("dyno-a never fenced itself although dyno-b reached the database and took the lease")
	}
	if !fencedAt.Before(tookAt) {
		t.Fatalf("dyno-a fenced at +%s, after dyno-b took the lease at +%s", fencedAt.Sub(cutAt), tookAt.Sub(cutAt))
	}
	if took := tookAt.Sub(cutAt); took < backup.DefaultLeaseTTL-backup.DefaultLeaseTTL/3 || took > 15*time.Second {
		t.Fatalf("dyno-b took the lease %s after dyno-a was cut off; want about one TTL", took)
	}
	t.Logf("cut off at 0, fenced at +%s, taken over at +%s", fencedAt.Sub(cutAt), tookAt.Sub(cutAt))
}

// A clean release is taken over within a second, on SQLite (polling) as on
// PostgreSQL (NOTIFY, and polling).
func TestStandbyTakesOverWithinASecondOfRelease(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			db := newDatabase(t, kind)
			clock := clockwork.NewFakeClock()
			dirA := t.TempDir()
			newStore(t, dirA, 128<<10)
			a := start(t, db, instOpts{dataDir: dirA, name: "dyno-a", clock: clock})
			b := start(t, db, instOpts{name: "dyno-b", noWait: true, clock: clock})
			testwait.For(t, 10*time.Second, "dyno-b in standby", func() bool {
				clock.Advance(100 * time.Millisecond)
				st, _ := b.svc.Status()
				return st == bus.StateStandby
			})
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
			releasedAt := clock.Now()
			testwait.For(t, 10*time.Second, "dyno-b to hold the lease", func() bool {
				if _, d := b.svc.Status(); d.LeaseHeld {
					return true
				}
				clock.Advance(50 * time.Millisecond)
				return false
			})
			if took := clock.Since(releasedAt); took > time.Second {
				t.Fatalf("dyno-b took the lease %s after the release; want within 1 s", took)
			}
		})
	}
}

// A standby that stalls (its reads stop for a while, as a paused process
// or a frozen VM) has seen nothing meanwhile: its watch starts over, and it
// does not take a lease whose holder may have been kept from renewing by an
// outage it never saw.
func TestStandbyThatStalledWatchesAgain(t *testing.T) {
	db := newDatabase(t, "sqlite")
	st := db.mustOpen(t)
	now := clockStart()
	if _, ok, err := st.AcquireLease(context.Background(), session, "quiet-holder", now, backup.DefaultLeaseTTL, backup.Lease{}); !ok || err != nil {
		t.Fatalf("seed lease: %v %v", ok, err)
	}
	b := start(t, db, instOpts{name: "dyno-b", noWait: true})
	testwait.For(t, 10*time.Second, "dyno-b watching for a while", func() bool {
		b.clock.Advance(100 * time.Millisecond)
		_, d := b.svc.Status()
		return d.LeaseHolder == "quiet-holder" && d.LeaseWatchMS >= 1000
	})
	// One jump of more than a TTL: a stall. The read after it must not take.
	b.clock.Advance(backup.DefaultLeaseTTL + time.Second)
	testwait.For(t, 10*time.Second, "a read after the stall", func() bool {
		_, d := b.svc.Status()
		return d.LeaseHolder == "quiet-holder" && d.LeaseWatchMS == 0
	})
	if _, d := b.svc.Status(); d.LeaseHeld {
		t.Fatal("dyno-b took the lease right after a stall")
	}
	// Watching again, a whole TTL of answered reads: now it takes it.
	testwait.For(t, 20*time.Second, "dyno-b to take the lease", func() bool {
		b.clock.Advance(250 * time.Millisecond)
		_, d := b.svc.Status()
		return d.LeaseHeld
	})
}

// A holder cut off alone from the database, with no shared bus to hear a
// standby on, learns of the takeover from WhatsApp: its own gateway's
// stream_replaced while its renewals fail fences it (conn.standby for its
// own instance, standby until the lease is its own again), so the two
// instances do not trade the stream. While its renewals succeed, a
// stream_replaced is not about the lease.
func TestStreamReplacedWhileRenewalsFailFencesTheHolder(t *testing.T) {
	db := newDatabase(t, "sqlite")
	clock := clockwork.NewFakeClock()
	dir := t.TempDir()
	newStore(t, dir, 128<<10)
	cut := newFaults()
	a := start(t, db, instOpts{dataDir: dir, name: "dyno-a", clock: clock, open: openFaulty(db, cut)})
	standby := make(chan *nats.Msg, 64)
	ssub, _ := a.nc.ChanSubscribe(a.subj.Conn(bus.ConnStandby), standby)
	defer ssub.Unsubscribe()
	replaced := func() {
		ev := bus.ConnEvent{Kind: bus.ConnStreamReplaced, Instance: a.unit}
		ev.Stamp(session, clock.Now())
		if err := bus.Publish(a.nc, a.subj.Conn(bus.ConnStreamReplaced), ev); err != nil {
			t.Fatal(err)
		}
		if err := a.nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	ownStandby := func() bool {
		for {
			select {
			case m := <-standby:
				var ev bus.ConnEvent
				if jsonUnmarshal(m.Data, &ev) == nil && ev.Instance == a.unit {
					return true
				}
			default:
				return false
			}
		}
	}

	// Renewals succeed: a stream_replaced is no reason to fence.
	replaced()
	testwait.For(t, 10*time.Second, "a renewal after it", func() bool {
		clock.Advance(time.Second)
		_, d := a.svc.Status()
		return d.LeaseHeld && d.DatabaseOK
	})
	if ownStandby() {
		t.Fatal("dyno-a fenced on stream_replaced with its database answering")
	}

	for _, op := range []string{"AcquireLease", "List", "Payload", "InsertSnapshot", "ReleaseLease"} {
		cut.set(op, -1, nil)
	}
	testwait.For(t, 10*time.Second, "a failed renewal", func() bool {
		clock.Advance(500 * time.Millisecond)
		return !dbOK(a)
	})
	if ownStandby() {
		t.Fatal("dyno-a fenced on a failed renewal alone, with no standby heard")
	}
	replaced()
	testwait.For(t, 10*time.Second, "conn.standby for dyno-a's own gateway", func() bool {
		clock.Advance(100 * time.Millisecond)
		return ownStandby()
	})
	if st, d := a.svc.Status(); st != bus.StateStandby || d.LeaseHeld {
		t.Fatalf("dyno-a after the fence: %s, lease held %v; want standby", st, d.LeaseHeld)
	}
	a.noAnswer(300*time.Millisecond, "dyno-a is fenced until the lease is its own again")
}
