package backup

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
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
	// StandbyRetry and this start its watch over (see acquireLease).
	watchGapSlack = 2 * time.Second
	// DefaultWatchMaxGap is LeaseWatch.MaxGap with the default StandbyRetry.
	DefaultWatchMaxGap = DefaultStandbyRetry*4 + watchGapSlack
)

// acquireLease blocks until this instance holds the lease: while another
// holder has it, it is standby. It reads the row every StandbyRetry (at once
// when PostgreSQL says a lease was released) and takes it when it is free,
// or when it has watched the very same row (holder, version, renewal time)
// for a whole TTL (LeaseWatch: ours, or the longer one the holder advertises)
// with every read answered: a failed read starts the
// watch over, so a database outage seen by both sides always lets the live
// holder's first renewal after it win.
//
// Database errors are retried with backoff, staying in standby: only when no
// other holder has been seen (otherSeen is false and no attempt found one),
// the database has failed for DBWait and there is local state to run on does
// it give up, and Run goes degraded.
//
// tookOver reports that another holder had the lease before us (we waited
// for it, or took its stale row): it used the session meanwhile.
func (s *Service) acquireLease(ctx context.Context, st Store, otherSeen bool) (tookOver bool, err error) {
	released := make(chan struct{}, 1)
	wctx, stopWatch := context.WithCancel(ctx)
	var watchWG sync.WaitGroup
	defer func() { stopWatch(); watchWG.Wait(); s.watching("", time.Time{}, time.Time{}) }()
	if w, ok := st.(LeaseWatcher); ok {
		watchWG.Go(func() { s.watchReleases(wctx, w, released) })
	}

	watch := LeaseWatch{TTL: s.opts.LeaseTTL, MaxGap: s.watchMaxGap()}
	var (
		announced    time.Time
		failingSince time.Time
		logged       bool
	)
	delay := time.Second
	for {
		sent := s.clock.Now()
		stale := watch.Stale(sent)
		cctx, cancel := withTimeout(ctx, s.clock, dbCallTimeout)
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, sent, s.opts.LeaseTTL, stale)
		cancel()
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		wait := s.opts.StandbyRetry
		switch {
		case err != nil:
			watch.Reset() // the rule: an unanswered read starts the watch over
			s.watching("", time.Time{}, time.Time{})
			s.noteErr(fmt.Errorf("take lease: %w", err))
			if failingSince.IsZero() {
				failingSince = s.clock.Now()
			}
			state := bus.StateDegraded
			if otherSeen {
				state = bus.StateStandby
			}
			s.setWaitingState(state, false)
			if !otherSeen && s.clock.Since(failingSince) >= s.opts.DBWait && s.hasLocalState() {
				return false, err
			}
			s.log.Warn("taking the session lease failed; retrying", "err", err, "retry_in", delay)
			wait = delay
			delay = min(delay*2, 5*time.Second)
		case ok:
			s.watching("", time.Time{}, time.Time{})
			s.holdLease(lease, sent)
			s.noteDB(true)
			if stale.Holder != "" {
				s.log.Warn("took over the session lease: its holder did not renew it for a whole lease TTL",
					"previous_holder", stale.Holder, "watched", watch.Need(stale))
			} else {
				s.log.Info("session lease held", "ttl", s.opts.LeaseTTL)
			}
			return otherSeen || stale.Holder != "", nil
		default:
			failingSince, delay = time.Time{}, time.Second
			s.setWaitingState(bus.StateStandby, true)
			if lease.Holder == "" { // released between two statements: read again now
				watch.Reset()
				s.watching("", time.Time{}, time.Time{})
				wait = 0
				break
			}
			otherSeen = true
			watch.Answered(lease, sent, s.clock.Now())
			_, since, seen := watch.Watched()
			s.watching(lease.Holder, since, seen)
			if !logged {
				s.log.Warn("another instance holds the session; standby until it releases the lease, or stops renewing it for a whole lease TTL",
					"holder", lease.Holder, "watch", watch.Need(lease))
				logged = true
			}
			if announced.IsZero() || s.clock.Since(announced) >= standbyAnnounce {
				announced = s.clock.Now()
				s.publishStandby("another instance holds the session lease")
			}
		}
		if wait == 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-released:
		case <-s.clock.After(wait):
		}
	}
}

// watchMaxGap bounds the time between two answered reads of a standby (and,
// since a slow read proves nothing of the span it took, one read's time).
func (s *Service) watchMaxGap() time.Duration {
	return s.opts.StandbyRetry*4 + watchGapSlack
}

// watchReleases forwards released-lease notifications until ctx ends; a
// failed listener is restarted after a pause (polling covers the gap).
func (s *Service) watchReleases(ctx context.Context, w LeaseWatcher, released chan<- struct{}) {
	for ctx.Err() == nil {
		err := w.WatchLeases(ctx, s.cfg.SessionID, func() {
			select {
			case released <- struct{}{}:
			default:
			}
		})
		if err != nil && ctx.Err() == nil {
			s.log.Debug("lease release listener failed; polling meanwhile", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-s.clock.After(5 * time.Second):
		}
	}
}

// publishStandby tells this instance's gateway (and only it: the event
// carries our instance) that another instance holds the session.
func (s *Service) publishStandby(reason string) {
	ev := bus.ConnEvent{Kind: bus.ConnStandby, Reason: reason, Instance: s.unit}
	ev.Stamp(s.cfg.SessionID, s.clock.Now())
	_ = bus.Publish(s.opts.NC, s.subj.Conn(bus.ConnStandby), ev)
}

// holdLease records a successful take or renewal written at sent.
func (s *Service) holdLease(l Lease, sent time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The row keeps acquired_at while one holder renews it: the same value
	// as before means nobody else held it in between.
	s.kept = !s.leaseSince.IsZero() && s.leaseSince.Equal(l.AcquiredAt)
	s.leaseHeld, s.leaseUntil, s.renewedAt, s.leaseSince = true, l.ExpiresAt, sent, l.AcquiredAt
	s.failingSince = time.Time{}
}

// keptLease reports whether the last take renewed a lease this process held
// before, without anyone else holding it in between (after fencing).
func (s *Service) keptLease() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.kept
}

// renewLoop renews the lease every TTL/3 on the injected clock, and every
// probeInterval while the database is failing or a snapshot waits in the
// local fallback only: whichever call noticed the outage, the database's
// return is seen within a second and the local snapshot shipped at once.
// Each call gets its own bound: a blackholed database turns the state
// degraded instead of hanging the loop.
func (s *Service) renewLoop(ctx context.Context) {
	for {
		wait := s.opts.LeaseTTL / 3
		if s.needsProbe() {
			wait = min(wait, probeInterval)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		case <-s.clock.After(wait):
		}
		st, _ := s.backend()
		if st == nil {
			continue
		}
		sent := s.clock.Now()
		cctx, cancel := withTimeout(ctx, s.clock, min(s.opts.LeaseTTL/3, dbCallTimeout))
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, sent, s.opts.LeaseTTL, Lease{})
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		wasOK, wasHeld := s.dbOK, s.leaseHeld
		s.mu.Unlock()
		switch {
		case err != nil:
			s.noteErr(fmt.Errorf("renew lease: %w", err))
			if wasOK {
				s.log.Warn("lease renewal failed", "err", err)
			}
			s.mu.Lock()
			if s.failingSince.IsZero() {
				s.failingSince = sent
			}
			s.mu.Unlock()
			s.noteDB(false)
			if s.shouldFence() {
				s.leaseLost("", "fenced: the database is unreachable from here while a standby instance reaches it")
				return
			}
			continue
		case !ok && lease.Holder != "" && lease.Holder != s.opts.Instance:
			s.noteDB(true)
			s.leaseLost(lease.Holder, "")
			return
		case !ok:
			s.noteDB(true)
			continue
		}
		s.holdLease(lease, sent)
		s.mu.Lock()
		s.failingSince = time.Time{}
		s.mu.Unlock()
		s.noteDB(true)
		if !wasHeld {
			s.log.Info("session lease held again")
		}
		if !wasOK {
			s.log.Info("database answers again")
		}
		if !wasOK || s.hasUnshipped() {
			// The database is back: the newest snapshot may be in the local
			// fallback only (guarantee 4).
			s.shipLocal()
		}
	}
}

// needsProbe: the database failed last time, or a snapshot is local only.
func (s *Service) needsProbe() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.dbOK || s.unshippedRead > 0
}

// kickRenewal wakes the renewal loop now (a database call just failed).
func (s *Service) kickRenewal() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// shouldFence is the holder's half of the lease rule: its renewals fail,
// and a standby backup of another instance has said since our last renewal
// that it has seen our row unchanged for half a TTL with the database
// answering it: it takes the lease at a whole TTL. Without that word (a
// database outage for everyone, or no shared bus), the holder keeps its
// socket: nobody takes the lease while nobody reaches the database.
func (s *Service) shouldFence() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaseHeld && !s.failingSince.IsZero() && s.contenderAt.After(s.renewedAt)
}

// onStreamReplaced is the fence of a holder cut off alone from the database
// with no shared bus to hear a standby on: WhatsApp ending our gateway's
// stream while our renewals fail means another instance reached the database,
// took the lease and connected. Without this the two would trade the stream
// (our gateway reconnects after its pause); with it we stand by like any
// instance that lost the lease, and restore what the new holder stores once
// the lease is ours again.
func (s *Service) onStreamReplaced() {
	s.mu.Lock()
	failing := s.leaseHeld && !s.failingSince.IsZero()
	s.mu.Unlock()
	if failing {
		s.leaseLost("", "fenced: WhatsApp replaced our stream while the database is unreachable from here, so another instance took the session")
	}
}

// onBackupHeartbeat follows the standby backups of other instances that
// watch our lease (see shouldFence): the last word counts.
func (s *Service) onBackupHeartbeat(hb bus.Heartbeat, d bus.BackupDetails) {
	if hb.Instance == s.opts.Instance || hb.State != bus.StateStandby || d.LeaseHolder != s.opts.Instance {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if d.DatabaseOK && time.Duration(d.LeaseWatchMS)*time.Millisecond >= s.opts.LeaseTTL/2 {
		s.contenderAt = s.clock.Now()
	} else {
		s.contenderAt = time.Time{}
	}
}

// watching records the standby's watch of the holder's row for the
// heartbeat: unchanged from since to seen, the last answered read (zero
// since: none). Only that span counts, never the time since: a read that
// hangs proves nothing. It beats at once when the span reaches half a TTL,
// so a holder cut off from the database hears of it in time.
func (s *Service) watching(holder string, since, seen time.Time) {
	s.mu.Lock()
	half := !since.IsZero() && seen.Sub(since) >= s.opts.LeaseTTL/2
	changed := half != s.watchHalf
	s.watchHolder, s.watchSince, s.watchSeen, s.watchHalf = holder, since, seen, half
	s.mu.Unlock()
	if changed {
		s.kickBeat()
	}
}

// leaseLost ends the epoch: another instance holds the lease (holder), or
// this one fenced itself (why).
func (s *Service) leaseLost(holder, why string) {
	s.mu.Lock()
	s.leaseHeld = false
	fire := s.lost != nil && !s.lostFired
	if fire {
		s.lostFired = true
		close(s.lost)
	}
	s.mu.Unlock()
	if !fire {
		return
	}
	if holder != "" {
		s.noteErr(errors.New("session lease lost to " + holder))
		s.log.Error("session lease lost to another instance; standby: database snapshots stop until the lease is ours again", "holder", holder)
		return
	}
	s.noteErr(errors.New("session lease " + why))
	s.log.Error("session lease "+why+"; the gateway closes its socket until the lease is renewed or taken over", "ttl", s.opts.LeaseTTL)
}

// reconnect runs while degraded: once the database answers, it takes the
// lease, starts River and stores a fresh snapshot there (guarantee 4). If
// another instance holds the lease by then, the epoch ends (standby).
func (s *Service) reconnect(ctx context.Context) {
	delay := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.clock.After(delay):
		}
		delay = min(delay*2, 5*time.Second)
		st, err := s.connect(ctx)
		if err != nil {
			s.noteErr(err)
			continue
		}
		sent := s.clock.Now()
		cctx, cancel := withTimeout(ctx, s.clock, dbCallTimeout)
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, sent, s.opts.LeaseTTL, Lease{})
		cancel()
		if err != nil {
			s.noteErr(fmt.Errorf("take lease: %w", err))
			st.Close()
			continue
		}
		if !ok {
			if lease.Holder == "" {
				st.Close()
				continue
			}
			s.mu.Lock()
			s.store, s.dbOK = st, true
			s.mu.Unlock()
			s.leaseLost(lease.Holder, "")
			return
		}
		s.holdLease(lease, sent)
		if err := s.startQueue(st); err != nil {
			s.noteErr(err)
			s.release(ctx, st)
			st.Close()
			continue
		}
		s.log.Info("database back: snapshots go to it again")
		s.shipLocal()
		s.renewLoop(ctx)
		return
	}
}

// holdsLease is false once the lease may have expired: renewals that kept
// failing (database down) leave it to whoever takes it next.
func (s *Service) holdsLease() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaseHeldLocked()
}

func (s *Service) leaseHeldLocked() bool {
	return s.leaseHeld && s.clock.Now().Before(s.leaseUntil)
}

// release frees the lease, within ctx (the shutdown's deadline) and at most
// releaseTimeout.
func (s *Service) release(ctx context.Context, st Store) {
	ctx, cancel := withTimeout(ctx, s.clock, releaseTimeout)
	defer cancel()
	if err := st.ReleaseLease(ctx, s.cfg.SessionID, s.opts.Instance); err != nil {
		s.log.Warn("lease release failed; a standby takes it after a lease TTL", "err", err, "ttl", s.opts.LeaseTTL)
		return
	}
	s.mu.Lock()
	s.leaseHeld = false
	s.mu.Unlock()
	s.log.Info("session lease released")
}
