package backup

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
)

// Lease timing (see the package doc for the rule they implement).
const (
	// DefaultLeaseTTL is how long a lease row must stay unchanged, seen by a
	// standby with the database answering, before the standby may take it:
	// the crash takeover time.
	DefaultLeaseTTL = 10 * time.Second
	// DefaultStandbyRetry is how often a standby reads the lease row: a
	// clean release is seen within it even without LISTEN/NOTIFY (SQLite).
	DefaultStandbyRetry = 500 * time.Millisecond
	// probeInterval is how often a holder whose database failed, or who has
	// a snapshot only in the local fallback, tries the database again.
	probeInterval = 500 * time.Millisecond
	// standbyAnnounce spaces the conn.standby events of a waiting standby.
	standbyAnnounce = 5 * time.Second
	// watchGapSlack: a standby's reads answered further apart than four
	// StandbyRetry and this start its watch over (see Acquire).
	watchGapSlack = 2 * time.Second
	// DefaultWatchMaxGap is LeaseWatch.MaxGap with the default StandbyRetry.
	DefaultWatchMaxGap = DefaultStandbyRetry*4 + watchGapSlack
	// listenRetry spaces restarts of a failed release listener.
	listenRetry = 5 * time.Second
)

// takeBackoff spaces the takes of a standby whose database fails.
var takeBackoff = backoff.Backoff{Min: time.Second, Max: 5 * time.Second}

// LeaseObserver hears what a LeaseKeeper finds besides its gains (Acquire
// returns) and losses (Term's channel closes): the database's health as the
// lease calls see it, the standby's waiting state, and renewals. The backup
// Service implements it for its heartbeat; calls come from the keeper's
// goroutine or Acquire's caller, never under the keeper's lock.
type LeaseObserver interface {
	// CallFailed records a failed lease call (the status's last error).
	CallFailed(err error)
	// DatabaseAnswers records whether the database answered a lease call.
	DatabaseAnswers(ok bool)
	// DatabaseAnswering reports the database's health as last recorded.
	DatabaseAnswering() bool
	// Waiting sets the state while the lease is not held (standby or
	// degraded), with the database's health.
	Waiting(state string, dbOK bool)
	// Standby announces that another instance holds the session.
	Standby(reason string)
	// WatchChanged: Watch's answer crossed half a TTL (beat now).
	WatchChanged()
	// NeedsProbe: renew at probeInterval rather than TTL/3 (the database
	// failed, or a snapshot waits in the local fallback only).
	NeedsProbe() bool
	// HasLocalState: the disk holds something to run on without the
	// database (Acquire may give up).
	HasLocalState() bool
	// Renewed follows a successful renewal; back says the database had
	// failed before it.
	Renewed(back bool)
}

// LeaseConfig configures a LeaseKeeper; zero durations take the defaults.
type LeaseConfig struct {
	Session      string
	Holder       string // this process's name in the lease row
	TTL          time.Duration
	StandbyRetry time.Duration
	DBWait       time.Duration // how long Acquire's database may fail before it gives up (no other holder seen)
	Clock        clockwork.Clock
	Log          *slog.Logger
	Observer     LeaseObserver
}

// LeaseKeeper holds one session's lease by the package's lease rule: Acquire
// waits as standby until the lease is this process's (a gain), Start renews
// it in one goroutine the keeper owns until Stop, and a term's channel
// (Term) closes when the lease is lost to another instance or this process
// fences itself (a loss). Time is the injected clock's. Modelled on River's
// leadership elector.
type LeaseKeeper struct {
	cfg LeaseConfig
	obs LeaseObserver
	log *slog.Logger

	kick chan struct{} // renew now

	runMu   sync.Mutex
	stopRun context.CancelFunc
	runWG   sync.WaitGroup

	mu         sync.Mutex
	held       bool
	until      time.Time // our lease's expiry as last written
	renewedAt  time.Time // when our last successful take or renewal was sent
	since      time.Time // the row's acquired_at while ours: unchanged means we never lost it
	kept       bool      // the last take found since unchanged
	generation int64     // the row's generation as our last take or renewal found it
	failing    time.Time // first failed renewal since the last success
	contender  time.Time // a standby of another instance last said it watched our row for half a TTL
	watchRow   string    // the standby's watch of the holder's row, for the heartbeat
	watchSince time.Time
	watchSeen  time.Time
	watchHalf  bool
	lost       chan struct{} // the current term's: closed at its loss
	lostFired  bool
}

// NewLeaseKeeper builds a keeper; it does nothing until Acquire or Start.
func NewLeaseKeeper(cfg LeaseConfig) *LeaseKeeper {
	if cfg.TTL == 0 {
		cfg.TTL = DefaultLeaseTTL
	}
	if cfg.StandbyRetry == 0 {
		cfg.StandbyRetry = DefaultStandbyRetry
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &LeaseKeeper{cfg: cfg, obs: cfg.Observer, log: cfg.Log, kick: make(chan struct{}, 1)}
}

// TTL is the keeper's lease TTL.
func (k *LeaseKeeper) TTL() time.Duration { return k.cfg.TTL }

// Acquire blocks until this instance holds the lease: while another holder
// has it, it is standby. It reads the row every StandbyRetry (at once when
// PostgreSQL says a lease was released) and takes it when it is free, or
// when it has watched the very same row (holder, version, renewal time) for
// a whole TTL (LeaseWatch: ours, or the longer one the holder advertises)
// with every read answered: a failed read starts the watch over, so a
// database outage seen by both sides always lets the live holder's first
// renewal after it win.
//
// Database errors are retried with backoff, staying in standby: only when
// no other holder has been seen (otherSeen is false and no attempt found
// one), the database has failed for DBWait and there is local state to run
// on does it give up with the error.
//
// tookOver reports that another holder had the lease before us (we waited
// for it, or took its stale row): it used the session meanwhile.
func (k *LeaseKeeper) Acquire(ctx context.Context, st Leases, otherSeen bool) (tookOver bool, err error) {
	released := make(chan struct{}, 1)
	wctx, stopWatch := context.WithCancel(ctx)
	var watchWG sync.WaitGroup
	defer func() { stopWatch(); watchWG.Wait(); k.watching("", time.Time{}, time.Time{}) }()
	if w, ok := st.(LeaseWatcher); ok {
		watchWG.Go(func() { k.listen(wctx, w, released) })
	}
	clock := k.cfg.Clock
	watch := LeaseWatch{TTL: k.cfg.TTL, MaxGap: k.watchMaxGap()}
	var (
		announced    time.Time
		failingSince time.Time
		logged       bool
	)
	failures := 0
	for {
		sent := clock.Now()
		stale := watch.Stale(sent)
		cctx, cancel := clockctx.WithTimeout(ctx, clock, dbCallTimeout)
		lease, ok, err := st.AcquireLease(cctx, k.cfg.Session, k.cfg.Holder, sent, k.cfg.TTL, stale)
		cancel()
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		wait := k.cfg.StandbyRetry
		switch {
		case err != nil:
			watch.Reset() // the rule: an unanswered read starts the watch over
			k.watching("", time.Time{}, time.Time{})
			k.obs.CallFailed(fmt.Errorf("take lease: %w", err))
			if failingSince.IsZero() {
				failingSince = clock.Now()
			}
			state := bus.StateDegraded
			if otherSeen {
				state = bus.StateStandby
			}
			k.obs.Waiting(state, false)
			if !otherSeen && clock.Since(failingSince) >= k.cfg.DBWait && k.obs.HasLocalState() {
				return false, err
			}
			failures++
			wait = takeBackoff.Step(failures)
			k.log.Warn("taking the session lease failed; retrying", "err", err, "retry_in", wait)
		case ok:
			k.watching("", time.Time{}, time.Time{})
			k.hold(lease, sent)
			k.obs.DatabaseAnswers(true)
			if stale.Holder != "" {
				k.log.Warn("took over the session lease: its holder did not renew it for a whole lease TTL",
					"previous_holder", stale.Holder, "watched", watch.Need(stale))
			} else {
				k.log.Info("session lease held", "ttl", k.cfg.TTL)
			}
			return otherSeen || stale.Holder != "", nil
		default:
			failingSince, failures = time.Time{}, 0
			k.obs.Waiting(bus.StateStandby, true)
			if lease.Holder == "" { // released between two statements: read again now
				watch.Reset()
				k.watching("", time.Time{}, time.Time{})
				wait = 0
				break
			}
			otherSeen = true
			watch.Answered(lease, sent, clock.Now())
			_, since, seen := watch.Watched()
			k.watching(lease.Holder, since, seen)
			if !logged {
				k.log.Warn("another instance holds the session; standby until it releases the lease, or stops renewing it for a whole lease TTL",
					"holder", lease.Holder, "watch", watch.Need(lease))
				logged = true
			}
			if announced.IsZero() || clock.Since(announced) >= standbyAnnounce {
				announced = clock.Now()
				k.obs.Standby("another instance holds the session lease")
			}
		}
		if wait == 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-released:
		case <-clock.After(wait):
		}
	}
}

// TakeOnce takes or renews the lease in one call (no watch: a held row is
// not taken), as a holder coming back from a database outage does. A take
// counts as a gain; a row held by another is for the caller to Lose.
func (k *LeaseKeeper) TakeOnce(ctx context.Context, st Leases) (Lease, bool, error) {
	sent := k.cfg.Clock.Now()
	cctx, cancel := clockctx.WithTimeout(ctx, k.cfg.Clock, dbCallTimeout)
	lease, ok, err := st.AcquireLease(cctx, k.cfg.Session, k.cfg.Holder, sent, k.cfg.TTL, Lease{})
	cancel()
	if err == nil && ok {
		k.hold(lease, sent)
	}
	return lease, ok, err
}

// watchMaxGap bounds the time between two answered reads of a standby (and,
// since a slow read proves nothing of the span it took, one read's time).
func (k *LeaseKeeper) watchMaxGap() time.Duration {
	return k.cfg.StandbyRetry*4 + watchGapSlack
}

// listen forwards released-lease notifications until ctx ends; a failed
// listener is restarted after a pause (polling covers the gap).
func (k *LeaseKeeper) listen(ctx context.Context, w LeaseWatcher, released chan<- struct{}) {
	for ctx.Err() == nil {
		err := w.WatchLeases(ctx, k.cfg.Session, func() {
			select {
			case released <- struct{}{}:
			default:
			}
		})
		if err != nil && ctx.Err() == nil {
			k.log.Debug("lease release listener failed; polling meanwhile", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-k.cfg.Clock.After(listenRetry):
		}
	}
}

// hold records a successful take or renewal written at sent.
func (k *LeaseKeeper) hold(l Lease, sent time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	// The row keeps acquired_at while one holder renews it: the same value
	// as before means nobody else held it in between.
	k.kept = !k.since.IsZero() && k.since.Equal(l.AcquiredAt)
	k.held, k.until, k.renewedAt, k.since = true, l.ExpiresAt, sent, l.AcquiredAt
	k.generation = l.Generation
	k.failing = time.Time{}
}

// Kept reports whether the last take renewed a lease this process held
// before, without anyone else holding it in between (after fencing).
func (k *LeaseKeeper) Kept() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.kept
}

// Generation is the lease generation of our last take or renewal (zero:
// never held): points are captured and fenced under it.
func (k *LeaseKeeper) Generation() int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.generation
}

// Held is false once the lease may have expired: renewals that kept failing
// (database down) leave it to whoever takes it next.
func (k *LeaseKeeper) Held() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.held && k.cfg.Clock.Now().Before(k.until)
}

// Watch is a standby's watch of the holder's row for the heartbeat: the
// holder and how long its row has been seen unchanged (ok false: none).
func (k *LeaseKeeper) Watch() (holder string, watched time.Duration, ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.watchSince.IsZero() {
		return "", 0, false
	}
	return k.watchRow, k.watchSeen.Sub(k.watchSince), true
}

// watching records the standby's watch of the holder's row: unchanged from
// since to seen, the last answered read (zero since: none). Only that span
// counts, never the time since: a read that hangs proves nothing. It tells
// the observer when the span reaches half a TTL, so a holder cut off from
// the database hears of it in time.
func (k *LeaseKeeper) watching(holder string, since, seen time.Time) {
	k.mu.Lock()
	half := !since.IsZero() && seen.Sub(since) >= k.cfg.TTL/2
	changed := half != k.watchHalf
	k.watchRow, k.watchSince, k.watchSeen, k.watchHalf = holder, since, seen, half
	k.mu.Unlock()
	if changed {
		k.obs.WatchChanged()
	}
}

// Release frees the lease, within ctx (the shutdown's deadline) and at most
// releaseTimeout.
func (k *LeaseKeeper) Release(ctx context.Context, st Leases) {
	ctx, cancel := clockctx.WithTimeout(ctx, k.cfg.Clock, releaseTimeout)
	defer cancel()
	if err := st.ReleaseLease(ctx, k.cfg.Session, k.cfg.Holder); err != nil {
		k.log.Warn("lease release failed; a standby takes it after a lease TTL", "err", err, "ttl", k.cfg.TTL)
		return
	}
	k.mu.Lock()
	k.held = false
	k.mu.Unlock()
	k.log.Info("session lease released")
}
