// Package storetest is the one conformance suite every backup.Store must
// pass; the postgres and sqlite packages run it against real databases.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/riverqueue/river/rivertype"
)

// Open returns a fresh, empty, migrated-or-not store for one test.
type Open func(t *testing.T) backup.Store

// Run runs every conformance test.
func Run(t *testing.T, open Open) {
	t.Helper()
	tests := []struct {
		name string
		fn   func(*testing.T, backup.Store)
	}{
		{"MigrateIdempotent", testMigrateIdempotent},
		{"InsertListPayload", testInsertListPayload},
		{"HookFailureRollsBack", testHookFailureRollsBack},
		{"JobCompletionOutsideItsWorkerRollsBack", testJobCompletionOutsideWorker},
		{"CancelledInsertLeavesNoRow", testCancelledInsert},
		{"Prune", testPrune},
		{"SessionsApart", testSessionsApart},
		{"LeaseExclusive", testLeaseExclusive},
		{"LeaseRace", testLeaseRace},
		{"WatchedTakeoverRacesRenewal", testWatchedTakeoverRacesRenewal},
		{"InsertNeedsLease", testInsertNeedsLease},
		{"LeaseGenerations", testLeaseGenerations},
		{"PointInsertListRead", testPointInsertListRead},
		{"PointRollsBackWithItsTransaction", testPointRollsBack},
		{"PointWithAMissingPieceIsRefused", testPointMissingPiece},
		{"PointFencedByGeneration", testPointFencedByGeneration},
		{"DeletePointsCollectsPieces", testDeletePointsCollectsPieces},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(s.Close)
			ctx := context.Background()
			if err := s.Migrate(ctx); err != nil {
				t.Fatalf("migrate: %v", err)
			}
			tc.fn(t, s)
		})
	}
}

func snap(session string, n int, at time.Time) backup.NewSnapshot {
	payload := bytes.Repeat([]byte{byte(n)}, 100+n)
	return backup.NewSnapshot{SessionID: session, CreatedAt: at, Reason: "manual",
		SHA256: fmt.Sprintf("%064x", n), SizeBytes: int64(1000 + n), StoredBytes: int64(len(payload)),
		Format: "bsnap/1", Payload: payload}
}

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 123_000_000, time.UTC)

func testMigrateIdempotent(t *testing.T, s backup.Store) {
	ctx := context.Background()
	for i := range 2 {
		if err := s.Migrate(ctx); err != nil {
			t.Fatalf("migrate again (%d): %v", i, err)
		}
	}
	if _, err := s.InsertSnapshot(ctx, snap("s", 1, t0), nil); err != nil {
		t.Fatalf("insert after migrations: %v", err)
	}
	if err := s.Migrate(ctx); err != nil {
		t.Fatalf("migrate with data: %v", err)
	}
	if l, _ := s.List(ctx, "s", 10); len(l) != 1 {
		t.Fatalf("migrate lost data: %d rows", len(l))
	}
}

func testInsertListPayload(t *testing.T, s backup.Store) {
	ctx := context.Background()
	if l, err := backup.Latest(ctx, s, "s"); err != nil || l != nil {
		t.Fatalf("latest of empty = %v, %v; want nil, nil", l, err)
	}
	var ids []int64
	for i := 1; i <= 3; i++ {
		id, err := s.InsertSnapshot(ctx, snap("s", i, t0.Add(time.Duration(i)*time.Minute)), nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if !(ids[0] < ids[1] && ids[1] < ids[2]) {
		t.Fatalf("ids not increasing: %v", ids)
	}
	list, err := s.List(ctx, "s", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].ID != ids[2] || list[2].ID != ids[0] {
		t.Fatalf("list = %+v; want newest first %v", list, ids)
	}
	want := snap("s", 3, t0.Add(3*time.Minute))
	got := list[0]
	if got.SessionID != "s" || got.Reason != want.Reason || got.SHA256 != want.SHA256 || got.SizeBytes != want.SizeBytes ||
		got.StoredBytes != want.StoredBytes || got.Format != want.Format || !got.CreatedAt.Equal(want.CreatedAt) {
		t.Fatalf("row = %+v; want %+v", got, want)
	}
	latest, err := backup.Latest(ctx, s, "s")
	if err != nil || latest == nil || latest.ID != ids[2] {
		t.Fatalf("latest = %+v, %v", latest, err)
	}
	p, err := s.Payload(ctx, ids[1])
	if err != nil || !bytes.Equal(p, snap("s", 2, t0).Payload) {
		t.Fatalf("payload = %d bytes, %v", len(p), err)
	}
	if _, err := s.Payload(ctx, ids[2]+1000); !errors.Is(err, backup.ErrNotFound) {
		t.Fatalf("missing payload err = %v; want ErrNotFound", err)
	}
	if l, _ := s.List(ctx, "s", 2); len(l) != 2 {
		t.Fatalf("limit 2 gave %d", len(l))
	}
}

func testHookFailureRollsBack(t *testing.T, s backup.Store) {
	ctx := context.Background()
	boom := errors.New("boom")
	var sawTx bool
	_, err := s.InsertSnapshot(ctx, snap("s", 1, t0), func(ctx context.Context, tx backup.Tx) error {
		sawTx = tx != nil
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v; want the hook's", err)
	}
	if !sawTx {
		t.Fatal("hook got no transaction")
	}
	if l, _ := s.List(ctx, "s", 10); len(l) != 0 {
		t.Fatalf("rolled-back insert left %d rows", len(l))
	}
}

// testJobCompletionOutsideWorker: the transaction handed to InTx is the
// driver's own, typed for River; completing a job there needs the job's
// worker (River's client in ctx), and its refusal rolls the row back.
func testJobCompletionOutsideWorker(t *testing.T, s backup.Store) {
	ctx := context.Background()
	_, err := s.InsertSnapshot(ctx, snap("s", 1, t0), func(ctx context.Context, tx backup.Tx) error {
		return tx.CompleteJob(ctx, &rivertype.JobRow{ID: 1, State: rivertype.JobStateRunning})
	})
	if err == nil || !strings.Contains(err.Error(), "Worker") {
		t.Fatalf("err = %v; want River's refusal outside a worker", err)
	}
	if l, _ := s.List(ctx, "s", 10); len(l) != 0 {
		t.Fatalf("refused completion left %d rows", len(l))
	}
}

// testCancelledInsert is the crash case: the context dies while the
// transaction is open (the process is killed mid-snapshot).
func testCancelledInsert(t *testing.T, s backup.Store) {
	ctx, cancel := context.WithCancel(context.Background())
	_, err := s.InsertSnapshot(ctx, snap("s", 1, t0), func(ctx context.Context, _ backup.Tx) error {
		cancel()
		<-ctx.Done()
		return ctx.Err()
	})
	if err == nil {
		t.Fatal("cancelled insert succeeded")
	}
	if l, err := s.List(context.Background(), "s", 10); err != nil || len(l) != 0 {
		t.Fatalf("cancelled insert left %d rows (%v)", len(l), err)
	}
}

func testPrune(t *testing.T, s backup.Store) {
	ctx := context.Background()
	var ids []int64
	for i := 1; i <= 5; i++ {
		id, err := s.InsertSnapshot(ctx, snap("s", i, t0), nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	n, err := s.Prune(ctx, "s", 2)
	if err != nil || n != 3 {
		t.Fatalf("prune = %d, %v; want 3", n, err)
	}
	list, _ := s.List(ctx, "s", 10)
	if len(list) != 2 || list[0].ID != ids[4] || list[1].ID != ids[3] {
		t.Fatalf("after prune: %+v", list)
	}
}

func testSessionsApart(t *testing.T, s backup.Store) {
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		if _, err := s.InsertSnapshot(ctx, snap("a", i, t0), nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.InsertSnapshot(ctx, snap("b", 9, t0), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prune(ctx, "a", 1); err != nil {
		t.Fatal(err)
	}
	if l, _ := s.List(ctx, "b", 10); len(l) != 1 {
		t.Fatalf("prune of a touched b: %d rows", len(l))
	}
	if l, _ := backup.Latest(ctx, s, "b"); l == nil || l.SHA256 != fmt.Sprintf("%064x", 9) {
		t.Fatalf("latest of b = %+v", l)
	}
}

func testLeaseExclusive(t *testing.T, s backup.Store) {
	ctx := context.Background()
	ttl := time.Minute
	none := backup.Lease{}
	l, ok, err := s.AcquireLease(ctx, "s", "one", t0, ttl, none)
	if err != nil || !ok || l.Holder != "one" || l.Version != 1 || !l.ExpiresAt.Equal(t0.Add(ttl).Truncate(time.Millisecond)) {
		t.Fatalf("first acquire = %+v %v %v", l, ok, err)
	}
	seen, ok, err := s.AcquireLease(ctx, "s", "two", t0.Add(30*time.Second), ttl, none)
	if err != nil || ok || !seen.Same(l) {
		t.Fatalf("second holder got %+v %v %v; want refused, the row unchanged (%+v)", seen, ok, err, l)
	}
	// Renewal by the holder moves the expiry, counts the version up and
	// keeps the acquisition time.
	l, ok, err = s.AcquireLease(ctx, "s", "one", t0.Add(40*time.Second), ttl, none)
	if err != nil || !ok || l.Version != 2 || !l.AcquiredAt.Equal(t0.Truncate(time.Millisecond)) ||
		!l.RenewedAt.Equal(t0.Add(40*time.Second).Truncate(time.Millisecond)) ||
		!l.ExpiresAt.Equal(t0.Add(100*time.Second).Truncate(time.Millisecond)) {
		t.Fatalf("renew = %+v %v %v", l, ok, err)
	}
	// Expired by the clock, but nobody watched it stay unchanged: still one's.
	if got, ok, err := s.AcquireLease(ctx, "s", "two", t0.Add(time.Hour), ttl, none); err != nil || ok || got.Holder != "one" {
		t.Fatalf("expiry alone freed the lease: %+v %v %v", got, ok, err)
	}
	// A stale observation (the row before the renewal) takes nothing.
	if got, ok, err := s.AcquireLease(ctx, "s", "two", t0.Add(time.Hour), ttl, seen); err != nil || ok || got.Holder != "one" {
		t.Fatalf("an outdated observation took the lease: %+v %v %v", got, ok, err)
	}
	// The row exactly as watched: two takes it.
	l, ok, err = s.AcquireLease(ctx, "s", "two", t0.Add(time.Hour), ttl, l)
	if err != nil || !ok || l.Holder != "two" || l.Version != 3 || !l.AcquiredAt.Equal(t0.Add(time.Hour).Truncate(time.Millisecond)) {
		t.Fatalf("takeover of the watched row = %+v %v %v", l, ok, err)
	}
	// Release by a non-holder does nothing; by the holder frees it.
	if err := s.ReleaseLease(ctx, "s", "one"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.AcquireLease(ctx, "s", "one", t0.Add(time.Hour), ttl, none); ok {
		t.Fatal("release by a non-holder freed the lease")
	}
	if err := s.ReleaseLease(ctx, "s", "two"); err != nil {
		t.Fatal(err)
	}
	if l, ok, err := s.AcquireLease(ctx, "s", "one", t0.Add(time.Hour), ttl, none); !ok || err != nil || l.Version != 1 {
		t.Fatalf("acquire after release = %+v %v %v", l, ok, err)
	}
	// Another session's lease is independent.
	if _, ok, err := s.AcquireLease(ctx, "other", "two", t0.Add(time.Hour), ttl, none); !ok || err != nil {
		t.Fatalf("other session = %v %v", ok, err)
	}
}

// testLeaseRace: many contenders at the same instant, exactly one wins.
func testLeaseRace(t *testing.T, s backup.Store) {
	ctx := context.Background()
	const n = 8
	var wg sync.WaitGroup
	won := make(chan string, n)
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			holder := fmt.Sprintf("h%d", i)
			_, ok, err := s.AcquireLease(ctx, "race", holder, t0, time.Minute, backup.Lease{})
			if err != nil {
				errs <- err
				return
			}
			if ok {
				won <- holder
			}
		})
	}
	wg.Wait()
	close(won)
	close(errs)
	for err := range errs {
		t.Errorf("acquire: %v", err)
	}
	var winners []string
	for w := range won {
		winners = append(winners, w)
	}
	if len(winners) != 1 {
		t.Fatalf("winners = %v; want exactly one", winners)
	}
}

// testWatchedTakeoverRacesRenewal: a standby's take of the row it watched
// and the holder's renewal land at the same time: exactly one wins, and a
// holder that lost never renews the lease back.
func testWatchedTakeoverRacesRenewal(t *testing.T, s backup.Store) {
	ctx := context.Background()
	for i := range 20 {
		session := fmt.Sprintf("race-%d", i)
		watched, ok, err := s.AcquireLease(ctx, session, "holder", t0, time.Minute, backup.Lease{})
		if err != nil || !ok {
			t.Fatalf("acquire: %v %v", ok, err)
		}
		var wg sync.WaitGroup
		var renewed, took bool
		var rerr, terr error
		wg.Go(func() {
			_, renewed, rerr = s.AcquireLease(ctx, session, "holder", t0.Add(time.Second), time.Minute, backup.Lease{})
		})
		wg.Go(func() {
			_, took, terr = s.AcquireLease(ctx, session, "standby", t0.Add(time.Second), time.Minute, watched)
		})
		wg.Wait()
		if rerr != nil || terr != nil {
			t.Fatalf("renew: %v, take: %v", rerr, terr)
		}
		if renewed == took {
			t.Fatalf("round %d: renewed %v and took %v; want exactly one", i, renewed, took)
		}
	}
}

// An insert with a LeaseHolder stores a row only while that holder has the
// lease unexpired, checked in the insert's own transaction.
func testInsertNeedsLease(t *testing.T, s backup.Store) {
	ctx := context.Background()
	if _, ok, err := s.AcquireLease(ctx, "s", "me", t0, time.Minute, backup.Lease{}); !ok || err != nil {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	if _, ok, err := s.AcquireLease(ctx, "other", "thief", t0, time.Minute, backup.Lease{}); !ok || err != nil {
		t.Fatalf("acquire other: %v %v", ok, err)
	}
	tests := []struct {
		name    string
		session string
		holder  string
		now     time.Time
		wantErr error
	}{
		{"held", "s", "me", t0.Add(30 * time.Second), nil},
		{"no check without a holder", "s", "", t0.Add(time.Hour), nil},
		{"expired", "s", "me", t0.Add(time.Minute), backup.ErrLeaseLost},
		{"another holder", "other", "me", t0, backup.ErrLeaseLost},
		{"no lease row", "none", "me", t0, backup.ErrLeaseLost},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := snap(tc.session, 50+i, t0)
			n.LeaseHolder, n.LeaseNow = tc.holder, tc.now
			before, err := s.List(ctx, tc.session, 100)
			if err != nil {
				t.Fatal(err)
			}
			calledHook := false
			_, err = s.InsertSnapshot(ctx, n, func(context.Context, backup.Tx) error { calledHook = true; return nil })
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("insert: %v; want %v", err, tc.wantErr)
			}
			after, _ := s.List(ctx, tc.session, 100)
			wantRows := len(before)
			if tc.wantErr == nil {
				wantRows++
			}
			if len(after) != wantRows || calledHook != (tc.wantErr == nil) {
				t.Fatalf("rows %d -> %d, hook called %v", len(before), len(after), calledHook)
			}
		})
	}
}
