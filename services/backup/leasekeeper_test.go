package backup_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/jonboulle/clockwork"
)

// recordingObserver is a LeaseObserver that keeps what it heard.
type recordingObserver struct {
	mu       sync.Mutex
	dbOK     bool
	failures int
	standby  int
	renewals int
}

var _ backup.LeaseObserver = (*recordingObserver)(nil)

func (o *recordingObserver) CallFailed(error) { o.mu.Lock(); o.failures++; o.mu.Unlock() }
func (o *recordingObserver) DatabaseAnswers(ok bool) {
	o.mu.Lock()
	o.dbOK = ok
	o.mu.Unlock()
}
func (o *recordingObserver) DatabaseAnswering() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.dbOK
}
func (o *recordingObserver) Waiting(string, bool) {}
func (o *recordingObserver) Standby(string)       { o.mu.Lock(); o.standby++; o.mu.Unlock() }
func (o *recordingObserver) WatchChanged()        {}
func (o *recordingObserver) NeedsProbe() bool     { return false }
func (o *recordingObserver) HasLocalState() bool  { return false }
func (o *recordingObserver) Renewed(bool)         { o.mu.Lock(); o.renewals++; o.mu.Unlock() }

func (o *recordingObserver) count(f func(*recordingObserver) int) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return f(o)
}

func newKeeper(holder string, clock clockwork.Clock, obs backup.LeaseObserver) *backup.LeaseKeeper {
	return backup.NewLeaseKeeper(backup.LeaseConfig{Session: session, Holder: holder, TTL: 9 * time.Second,
		StandbyRetry: 500 * time.Millisecond, DBWait: time.Minute, Clock: clock, Log: discard(), Observer: obs})
}

func keeperRow(t *testing.T, st backup.Store) backup.Lease {
	t.Helper()
	l, _, err := st.AcquireLease(context.Background(), session, "nobody", time.Unix(0, 0), time.Second, backup.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// A free lease is a gain at once; Start then renews it every TTL/3 of the
// fake clock, and a row taken by another instance ends the term.
func TestLeaseKeeperRenewsOnTheClockAndLosesToATakeover(t *testing.T) {
	st := newDatabase(t, "sqlite").mustOpen(t)
	clock := clockwork.NewFakeClock()
	obs := &recordingObserver{}
	k := newKeeper("a", clock, obs)
	ctx := context.Background()
	tookOver, err := k.Acquire(ctx, st, false)
	if err != nil || tookOver || !k.Held() {
		t.Fatalf("acquire free lease: tookOver %v, err %v, held %v; want a plain gain", tookOver, err, k.Held())
	}
	first := keeperRow(t, st)
	term := k.Term()
	k.Start(ctx, st)
	defer k.Stop()

	bctx, bcancel := context.WithTimeout(ctx, 10*time.Second)
	defer bcancel()
	if err := clock.BlockUntilContext(bctx, 1); err != nil {
		t.Fatal("the renewal loop never waited on the clock")
	}
	clock.Advance(2999 * time.Millisecond)
	if n := obs.count(func(o *recordingObserver) int { return o.renewals }); n != 0 {
		t.Fatalf("renewed %d times before TTL/3", n)
	}
	clock.Advance(time.Millisecond)
	testwait.For(t, 10*time.Second, "a renewal at TTL/3", func() bool {
		return obs.count(func(o *recordingObserver) int { return o.renewals }) >= 1
	})
	if now := keeperRow(t, st); now.Version <= first.Version || now.Holder != "a" {
		t.Fatalf("row after renewal = %+v; want a's, version above %d", now, first.Version)
	}

	steal(t, st, "b")
	testwait.For(t, 10*time.Second, "the term to end", func() bool {
		clock.Advance(time.Second)
		select {
		case <-term:
			return true
		default:
			return false
		}
	})
	if k.Held() {
		t.Fatal("still held after losing the row to b")
	}
}

// A standby gains a row its holder stopped renewing only after watching it
// unchanged for the holder's TTL, and says it took over.
func TestLeaseKeeperStandbyGainsAfterWatchingAWholeTTL(t *testing.T) {
	st := newDatabase(t, "sqlite").mustOpen(t)
	clock := clockwork.NewFakeClock()
	dead := newKeeper("dead", clock, &recordingObserver{})
	if _, err := dead.Acquire(context.Background(), st, false); err != nil {
		t.Fatal(err)
	}
	obs := &recordingObserver{}
	standby := newKeeper("standby", clock, obs)
	type result struct {
		tookOver bool
		err      error
	}
	done := make(chan result, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		tookOver, err := standby.Acquire(ctx, st, false)
		done <- result{tookOver, err}
	}()
	began := clock.Now()
	var res result
	testwait.For(t, 20*time.Second, "the standby's takeover", func() bool {
		select {
		case res = <-done:
			return true
		default:
			clock.Advance(100 * time.Millisecond)
			return false
		}
	})
	if res.err != nil || !res.tookOver || !standby.Held() {
		t.Fatalf("standby: tookOver %v, err %v, held %v", res.tookOver, res.err, standby.Held())
	}
	if waited := clock.Since(began); waited < 9*time.Second {
		t.Fatalf("took the row after %s of fake time; want at least the TTL (9s)", waited)
	}
	if obs.count(func(o *recordingObserver) int { return o.standby }) == 0 {
		t.Fatal("the standby never announced itself")
	}
	if row := keeperRow(t, st); row.Holder != "standby" {
		t.Fatalf("row holder = %q; want standby", row.Holder)
	}
}

// Stop ends the renewal loop and waits for it (goleak checks nothing is
// left); a second Stop and a Stop without Start are no-ops.
func TestLeaseKeeperStopWaitsForItsGoroutine(t *testing.T) {
	st := newDatabase(t, "sqlite").mustOpen(t)
	k := newKeeper("a", clockwork.NewFakeClock(), &recordingObserver{})
	k.Stop()
	k.Start(context.Background(), st)
	k.Start(context.Background(), st) // replaces the first loop
	k.Stop()
	k.Stop()
}
