package gateway

import (
	"context"
	"errors"
	"fmt"
	"github.com/blacksky-md/blacksky/internal/clockctx"
	"log/slog"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
)

// relayLogEvery collapses the log of a relay outage: the first failure is
// logged at once, then at most one summary line per period while it lasts,
// and one line when relay answers again.
const relayLogEvery = time.Minute

// ReceiptOf converts a whatsmeow receipt into its P.msg.receipt payload
// (without the session and time stamp).
func ReceiptOf(e *events.Receipt) bus.Receipt {
	typ := string(e.Type)
	if e.Type == types.ReceiptTypeDelivered {
		typ = "delivered" // whatsmeow's is the empty string
	}
	return bus.Receipt{
		Chat:      e.Chat.String(),
		Sender:    e.Sender.ToNonAD().String(),
		IDs:       append([]string{}, e.MessageIDs...),
		Type:      typ,
		Timestamp: e.Timestamp.UTC(),
	}
}

// onReceipt hands a receipt to relay; true (acknowledge it) once relay has
// stored it.
func (g *Gateway) onReceipt(e *events.Receipt) bool {
	r := ReceiptOf(e)
	r.Stamp(g.cfg.Session, g.clock.Now())
	// whatsmeow has already resent the message a retry receipt asks for: a
	// redelivery of the receipt would make it resend the message again, so
	// it is acknowledged whatever relay says.
	retry := e.Type == types.ReceiptTypeRetry
	_, ok := g.store(bus.RelayStoreRequest{Receipt: &r}, "receipt", firstID(r.IDs), !retry)
	return ok || retry
}

func firstID(ids []string) string {
	if len(ids) == 0 {
		return ""
	}
	return ids[0]
}

// store asks relay to store one item and waits for its answer, at most
// RelayTimeout on the injected clock. ok is true only for relay's ok:
// anything else (no relay running, a transport error, a timeout, a
// refusal) is logged, collapsed, and counted when unacked says the caller
// then leaves the item unacknowledged for WhatsApp to deliver again.
func (g *Gateway) store(req bus.RelayStoreRequest, kind, id string, unacked bool) (bus.RelayStoreReply, bool) {
	ctx, cancel := clockctx.WithTimeout(context.Background(), g.clock, g.cfg.RelayTimeout)
	defer cancel()
	var reply bus.RelayStoreReply
	err := bus.Request(ctx, g.nc, g.subj.RelayStore(), req, &reply)
	var reason string
	gone := false
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		reason, gone = "relay not running (no responder on relay.store)", true
	case errors.Is(context.Cause(ctx), clockctx.ErrTimeout) || errors.Is(err, nats.ErrTimeout):
		reason = fmt.Sprintf("no answer from relay within %s", g.cfg.RelayTimeout)
	case err != nil:
		reason = err.Error()
	case !reply.OK:
		reason = "relay refused: " + reply.Error
	default:
		if g.relay.ok(g.log, g.clock.Now()) {
			g.signalRelayBack()
		}
		return reply, true
	}
	g.relay.failed(g.log, g.clock.Now(), failure{kind: kind, id: id, reason: reason, unacked: unacked, gone: gone})
	return reply, false
}

// failure is one hand-over relay did not confirm.
type failure struct {
	kind, id, reason string
	// unacked: the item stays unacknowledged (WhatsApp delivers it again
	// after a reconnect); a retry receipt is acknowledged anyway.
	unacked bool
	// gone: relay is not running at all (no responder), so its next
	// heartbeat means it is back.
	gone bool
}

// relayStats counts hand-overs relay did not confirm and collapses their
// log lines. Its methods are safe for concurrent use (handler calls run on
// whatsmeow's goroutines).
type relayStats struct {
	mu      sync.Mutex
	unacked int64 // since start: shown in the heartbeat
	lastErr string
	lastAt  time.Time
	// The current outage: failures since the last success, when it began,
	// and when it was last logged.
	streak      int64
	streakStart time.Time
	loggedAt    time.Time

	// Redelivery (redeliver.go). pending: items left unacknowledged on the
	// current connection, which only a reconnect brings again. back: relay
	// counts as back since the last failure (a store succeeded, or its
	// heartbeat was believed). beatSpent: a heartbeat was already believed
	// in this outage; another one is believed only after relay was seen
	// gone again (no responder, or a heartbeat saying its database is
	// down) or stored something, so a relay whose heartbeat says ok while
	// its stores keep failing cannot make the socket reconnect every
	// minute.
	pending      int64
	back         bool
	beatSpent    bool
	redeliveries int64 // reconnects made for redelivery, since start
}

func (s *relayStats) failed(log *slog.Logger, now time.Time, f failure) {
	kind, id, reason := f.kind, f.id, f.reason
	s.mu.Lock()
	if f.unacked {
		s.unacked++
		s.pending++
	}
	s.back = false
	if f.gone {
		s.beatSpent = false
	}
	s.lastErr, s.lastAt = reason, now
	s.streak++
	first := s.streak == 1
	if first {
		s.streakStart = now
	}
	summary := !first && now.Sub(s.loggedAt) >= relayLogEvery
	if first || summary {
		s.loggedAt = now
	}
	streak, since := s.streak, s.streakStart
	s.mu.Unlock()
	switch {
	case first:
		log.Warn("relay did not store an incoming "+kind+"; left unacknowledged for WhatsApp to deliver again",
			"id", id, "reason", reason)
	case summary:
		log.Warn("relay still not storing: incoming messages and receipts left unacknowledged",
			"unacked", streak, "since", now.Sub(since).Round(time.Second), "reason", reason)
	}
}

// ok records a store relay confirmed; true when relay has just come back
// with items of the current connection still unacknowledged.
func (s *relayStats) ok(log *slog.Logger, now time.Time) bool {
	s.mu.Lock()
	streak, since := s.streak, s.streakStart
	s.streak = 0
	wasBack := s.back
	s.back, s.beatSpent = true, false
	pending := s.pending
	s.mu.Unlock()
	if streak > 0 {
		log.Info("relay storing again", "unacked_meanwhile", streak, "outage", now.Sub(since).Round(time.Second))
	}
	return !wasBack && pending > 0
}

// details fills the heartbeat's relay fields.
func (s *relayStats) details(d *bus.GatewayDetails) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d.RelayUnacked = s.unacked
	d.RelayRedeliveryReconnects = s.redeliveries
	d.LastRelayError = s.lastErr
	if !s.lastAt.IsZero() {
		t := s.lastAt.UTC()
		d.LastRelayErrorAt = &t
	}
}
