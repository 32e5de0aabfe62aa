package backup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// The holder's half of the lease rule: a term runs from a gain (Acquire or
// TakeOnce) to its loss; Start renews the lease meanwhile and fences this
// process when the rule says another instance is taking over.

// Term arms a new term and returns its channel, closed once the term ends:
// the lease went to another instance, or this process fenced itself. A loss
// before the next Term call ends nothing (no term is armed).
func (k *LeaseKeeper) Term() <-chan struct{} {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.lost, k.lostFired = make(chan struct{}), false
	return k.lost
}

// Lose ends the term: another instance holds the lease (holder), or this one
// fenced itself (why).
func (k *LeaseKeeper) Lose(holder, why string) {
	k.mu.Lock()
	k.held = false
	fire := k.lost != nil && !k.lostFired
	if fire {
		k.lostFired = true
		close(k.lost)
	}
	k.mu.Unlock()
	if !fire {
		return
	}
	if holder != "" {
		k.obs.CallFailed(errors.New("session lease lost to " + holder))
		k.log.Error("session lease lost to another instance; standby: database snapshots stop until the lease is ours again", "holder", holder)
		return
	}
	k.obs.CallFailed(errors.New("session lease " + why))
	k.log.Error("session lease "+why+"; the gateway closes its socket until the lease is renewed or taken over", "ttl", k.cfg.TTL)
}

// Start renews the lease on st in one goroutine the keeper owns, until ctx
// ends, Stop is called or the term is lost. One renewal loop at a time: a
// running one is stopped first.
func (k *LeaseKeeper) Start(ctx context.Context, st Leases) {
	k.Stop()
	ctx, cancel := context.WithCancel(ctx)
	k.runMu.Lock()
	defer k.runMu.Unlock()
	k.stopRun = cancel
	k.runWG.Go(func() {
		defer cancel()
		k.renew(ctx, st)
	})
}

// Stop ends the renewal loop and waits for it; a no-op when none runs.
func (k *LeaseKeeper) Stop() {
	k.runMu.Lock()
	defer k.runMu.Unlock()
	if k.stopRun != nil {
		k.stopRun()
		k.stopRun = nil
	}
	k.runWG.Wait()
}

// Kick wakes the renewal loop now (a database call just failed).
func (k *LeaseKeeper) Kick() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// renew renews every TTL/3 on the injected clock, and every probeInterval
// while the observer asks for probes (the database failing, or a snapshot in
// the local fallback only): whichever call noticed the outage, the
// database's return is seen within a second. Each call gets its own bound:
// a blackholed database turns the state degraded instead of hanging the
// loop.
func (k *LeaseKeeper) renew(ctx context.Context, st Leases) {
	clock := k.cfg.Clock
	for {
		wait := k.cfg.TTL / 3
		if k.obs.NeedsProbe() {
			wait = min(wait, probeInterval)
		}
		select {
		case <-ctx.Done():
			return
		case <-k.kick:
		case <-clock.After(wait):
		}
		sent := clock.Now()
		cctx, cancel := clockctx.WithTimeout(ctx, clock, min(k.cfg.TTL/3, dbCallTimeout))
		lease, ok, err := st.AcquireLease(cctx, k.cfg.Session, k.cfg.Holder, sent, k.cfg.TTL, Lease{})
		cancel()
		if ctx.Err() != nil {
			return
		}
		wasOK := k.obs.DatabaseAnswering()
		k.mu.Lock()
		wasHeld := k.held
		k.mu.Unlock()
		switch {
		case err != nil:
			k.obs.CallFailed(fmt.Errorf("renew lease: %w", err))
			if wasOK {
				k.log.Warn("lease renewal failed", "err", err)
			}
			k.mu.Lock()
			if k.failing.IsZero() {
				k.failing = sent
			}
			k.mu.Unlock()
			k.obs.DatabaseAnswers(false)
			if k.shouldFence() {
				k.Lose("", "fenced: the database is unreachable from here while a standby instance reaches it")
				return
			}
			continue
		case !ok && lease.Holder != "" && lease.Holder != k.cfg.Holder:
			k.obs.DatabaseAnswers(true)
			k.Lose(lease.Holder, "")
			return
		case !ok:
			k.obs.DatabaseAnswers(true)
			continue
		}
		k.hold(lease, sent)
		k.obs.DatabaseAnswers(true)
		if !wasHeld {
			k.log.Info("session lease held again")
		}
		if !wasOK {
			k.log.Info("database answers again")
		}
		k.obs.Renewed(!wasOK)
	}
}

// shouldFence is the holder's half of the lease rule: its renewals fail,
// and a standby backup of another instance has said since our last renewal
// that it has seen our row unchanged for half a TTL with the database
// answering it: it takes the lease at a whole TTL. Without that word (a
// database outage for everyone, or no shared bus), the holder keeps its
// socket: nobody takes the lease while nobody reaches the database.
func (k *LeaseKeeper) shouldFence() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.held && !k.failing.IsZero() && k.contender.After(k.renewedAt)
}

// StreamReplaced is the fence of a holder cut off alone from the database
// with no shared bus to hear a standby on: WhatsApp ending our gateway's
// stream while our renewals fail means another instance reached the
// database, took the lease and connected. Without this the two would trade
// the stream (our gateway reconnects after its pause); with it we stand by
// like any instance that lost the lease, and restore what the new holder
// stores once the lease is ours again.
func (k *LeaseKeeper) StreamReplaced() {
	k.mu.Lock()
	failing := k.held && !k.failing.IsZero()
	k.mu.Unlock()
	if failing {
		k.Lose("", "fenced: WhatsApp replaced our stream while the database is unreachable from here, so another instance took the session")
	}
}

// Contender follows the standby backups of other instances that watch our
// lease (see shouldFence), from their heartbeats: the last word counts.
func (k *LeaseKeeper) Contender(hb bus.Heartbeat, d bus.BackupDetails) {
	if hb.Instance == k.cfg.Holder || hb.State != bus.StateStandby || d.LeaseHolder != k.cfg.Holder {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if d.DatabaseOK && time.Duration(d.LeaseWatchMS)*time.Millisecond >= k.cfg.TTL/2 {
		k.contender = k.cfg.Clock.Now()
	} else {
		k.contender = time.Time{}
	}
}
