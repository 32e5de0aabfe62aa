package gateway

import (
	"context"
	"errors"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// awaitRestore asks the backup service to restore the session before the
// store is opened (CONTRACT guarantee 1) until it answers ok. Backup holds a
// request open while another instance still holds the lease: a request that
// times out is asked again at once, so one is always waiting and we start as
// soon as the lease frees. No responders, transport errors and refusals back
// off, at most RestoreMaxBackoff.
func (g *Gateway) awaitRestore(ctx context.Context) error {
	if g.State() != bus.StateStandby { // a lost lease already said standby
		g.setState(bus.StateWaitingRestore, "")
	}
	// While backup holds us back because another instance has the lease, it
	// says so on conn.standby; our heartbeat then says standby too, so
	// health does not mistake this instance for the one in charge.
	sub, err := g.nc.Subscribe(g.subj.Conn(bus.ConnStandby), func(m *nats.Msg) {
		if !g.ownStandby(m) {
			return
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.st.state == bus.StateWaitingRestore {
			g.st.state = bus.StateStandby
		}
	})
	if err != nil {
		g.log.Warn("subscribe conn.standby", "err", err)
	} else {
		defer func() { _ = sub.Unsubscribe() }()
	}
	bo := backoff.Backoff{
		Min:    min(g.cfg.ReconnectMin, RestoreMaxBackoff),
		Max:    min(g.cfg.ReconnectMax, RestoreMaxBackoff),
		Jitter: g.backoff.Jitter,
	}
	began := g.clock.Now()
	quietNoResponders := true
	for n := 1; ; {
		rctx, cancel := clockctx.WithTimeout(ctx, g.clock, g.cfg.RestoreTimeout)
		var reply bus.RestoreReply
		err := bus.Request(rctx, g.nc, g.subj.SessionRestoreFor(g.cfg.Unit), struct{}{}, &reply)
		timedOut := errors.Is(context.Cause(rctx), clockctx.ErrTimeout)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		delay := bo.Delay(n)
		switch {
		case err == nil && reply.Instance != g.cfg.Unit:
			// Not our backup's answer: it says nothing about our session.
			g.log.Warn("session restore answered by another instance; ignored", "instance", reply.Instance, "attempt", n)
		case err == nil && reply.OK:
			g.log.Info("session restore answered", "restored", reply.Restored, "source", reply.Source, "snapshot_id", reply.SnapshotID)
			g.mu.Lock()
			g.st.attempt = 0
			g.mu.Unlock()
			return nil
		case timedOut:
			// Backup is holding it (standby) or is slow: ask again now.
			g.log.Debug("session restore request unanswered; asking again", "after", g.cfg.RestoreTimeout)
			continue
		case err == nil:
			g.log.Warn("session restore refused; retrying", "err", reply.Error, "attempt", n)
		case errors.Is(err, nats.ErrNoResponders):
			// At start the backup service subscribes a moment after we ask
			// (in one process too): only a wait longer than that is news.
			if quietNoResponders && g.clock.Since(began) < noResponderGrace {
				g.log.Debug("backup service not subscribed yet; asking again", "attempt", n)
				delay = min(delay, noResponderRetry)
				break
			}
			quietNoResponders = false
			g.log.Info("backup service not answering the restore request yet; retrying", "attempt", n)
		default:
			g.log.Warn("session restore request failed; retrying", "err", err, "attempt", n)
		}
		g.mu.Lock()
		g.st.attempt = n
		g.mu.Unlock()
		t := g.clock.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.Chan():
		}
		n++
	}
}

// A gateway that starts with its backup asks before the backup has
// subscribed: it asks again every noResponderRetry, and says so only after
// noResponderGrace.
const (
	noResponderRetry = 50 * time.Millisecond
	noResponderGrace = 10 * time.Second
)

// ownStandby reports whether a conn.standby comes from this instance's
// backup; another instance's (a preboot's standby dyno on a shared NATS)
// is about that instance only.
func (g *Gateway) ownStandby(m *nats.Msg) bool {
	ev, err := bus.DecodeConnEvent(bus.ConnStandby, m.Data)
	if err != nil {
		g.log.Debug("ignoring a bad conn.standby", "err", err)
		return false
	}
	if ev.Instance != g.cfg.Unit {
		g.log.Debug("conn.standby of another instance ignored", "instance", ev.Instance)
		return false
	}
	return true
}
