package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// RedeliverEvery bounds the reconnects made so that WhatsApp redelivers
// what relay could not store: at most one per period (injected clock), so a
// relay that flaps cannot make the socket flap.
const RedeliverEvery = time.Minute

// WhatsApp sends an unacknowledged message or receipt again only on the
// next connection. When relay comes back after refusing items on the
// current connection, the gateway reconnects once (the supervisor's own
// drop and retry), so they come now rather than whenever the socket next
// drops, which may be hours away.
//
// Relay counts as back after a store it confirmed, or after its heartbeat
// with database_ok (see relayStats.beat for when one is believed). Either
// signals the loop; the loop decides. The liveness tick asks again, so a
// signal that came while the socket was not yet connected is not lost.

// signalRelayBack wakes the loop; a signal already waiting is enough.
func (g *Gateway) signalRelayBack() {
	select {
	case g.relayBack <- struct{}{}:
	default:
	}
}

// onRelayBeat hears relay's heartbeat (P.heartbeat.relay).
func (g *Gateway) onRelayBeat(m *nats.Msg) {
	dbOK, err := decodeRelayBeat(m.Data)
	if err != nil {
		g.log.Debug("ignoring a bad relay heartbeat", "err", err)
		return
	}
	if g.relay.beat(dbOK) {
		g.signalRelayBack()
	}
}

// decodeRelayBeat reads whether relay's heartbeat says its database
// answers. Details are decoded leniently, as health does: relay may add
// fields, and only database_ok matters here.
func decodeRelayBeat(data []byte) (dbOK bool, err error) {
	var hb bus.Heartbeat
	if err := json.Unmarshal(data, &hb); err != nil {
		return false, err
	}
	if hb.Service != bus.ServiceRelay {
		return false, fmt.Errorf("heartbeat of %q on relay's subject", hb.Service)
	}
	if len(hb.Details) == 0 {
		return false, errors.New("relay heartbeat without details")
	}
	var d bus.RelayDetails
	if err := json.Unmarshal(hb.Details, &d); err != nil {
		return false, fmt.Errorf("relay heartbeat details: %w", err)
	}
	return d.DatabaseOK, nil
}

// redeliver runs on the loop: when relay is back and items of the current
// connection are still unacknowledged, drop the socket and reconnect
// through the supervisor's retry, at most once per RedeliverEvery (a
// request within the period waits for its end on a timer). Only from
// "connected": pairing has no messages, standby and stopping have no
// socket, and any other state is already on its way to a new connection,
// which redelivers them anyway.
func (g *Gateway) redeliver(ctx context.Context) {
	if ctx.Err() != nil || g.retry != nil || g.State() != bus.StateConnected {
		return
	}
	n, back := g.relay.redeliverable()
	if n == 0 || !back {
		return
	}
	now := g.clock.Now()
	if !g.redeliveredAt.IsZero() {
		if wait := g.redeliveredAt.Add(RedeliverEvery).Sub(now); wait > 0 {
			if g.redeliverTimer == nil {
				g.log.Debug("relay is back; reconnecting for redelivery once the period is over", "in", wait, "unacked", n)
				g.redeliverTimer = g.clock.NewTimer(wait)
			}
			return
		}
	}
	stopTimer(&g.redeliverTimer)
	g.redeliveredAt = now
	g.relay.redelivering()
	g.log.Info(fmt.Sprintf("relay is back: reconnecting so WhatsApp redelivers %d unacknowledged messages and receipts", n),
		"unacked", n)
	g.drop("relay is back: reconnecting so WhatsApp redelivers unacknowledged messages", false)
}

// beat records relay's heartbeat; true when it is taken as relay being
// back with items of the current connection unacknowledged. A heartbeat
// saying the database is down only re-arms the next one. One heartbeat is
// believed per outage: if what it brought back fails again (relay up but
// not answering in time, say), only a store it confirms, or relay seen
// gone and back, counts.
func (s *relayStats) beat(dbOK bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !dbOK {
		s.beatSpent = false
		return false
	}
	if s.back || s.beatSpent || s.pending == 0 {
		return false
	}
	s.back, s.beatSpent = true, true
	return true
}

// newConnection forgets the unacknowledged items of the last connection:
// the new one brings them again, and those refused again count anew.
func (s *relayStats) newConnection() {
	s.mu.Lock()
	s.pending = 0
	s.mu.Unlock()
}

// redeliverable is how many items of the current connection are
// unacknowledged, and whether relay is back since the last failure.
func (s *relayStats) redeliverable() (pending int64, back bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pending, s.back
}

func (s *relayStats) redelivering() {
	s.mu.Lock()
	s.redeliveries++
	s.mu.Unlock()
}
