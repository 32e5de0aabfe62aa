package gateway

import (
	"strings"
	"testing"
	"time"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// reconnectedForRedelivery expects the redelivery reconnect: the socket
// dropped with no disconnect event, one retry scheduled (not counted as a
// reconnect after a failure), then a fresh connection.
func (h *harness) reconnectedForRedelivery() bus.ConnEvent {
	h.t.Helper()
	e := h.rec.next(h.t, bus.ConnReconnecting)
	h.reconnect()
	return e
}

// reconnect lets the scheduled retry connect and logs in.
func (h *harness) reconnect() {
	h.t.Helper()
	n := h.conn.get(connects)
	h.advanceUntil(500*time.Millisecond, "the reconnect", func() bool { return h.conn.get(connects) > n })
	h.rec.next(h.t, bus.ConnConnecting)
	h.conn.emit(&events.Connected{})
	h.rec.next(h.t, bus.ConnConnected)
}

// advanceToNext steps the clock until the next connection event comes,
// and checks its kind.
func (h *harness) advanceToNext(step time.Duration, kind string) bus.ConnEvent {
	h.t.Helper()
	h.advanceUntil(step, "conn."+kind, func() bool {
		n := len(h.rec.connEvents())
		h.rec.mu.Lock()
		defer h.rec.mu.Unlock()
		return n > h.rec.cursor
	})
	return h.rec.next(h.t, kind)
}

// storedIDs are the ids relay stored, each once, in seq order.
func storedIDs(h *harness) string {
	var ids []string
	for _, m := range h.relay.Messages() {
		ids = append(ids, m.ID)
	}
	return strings.Join(ids, ",")
}

func connects(f *fakeConn) int { return f.connects }

func disconnects(f *fakeConn) int { return f.disconnects }

func readReceipt(id string) *events.Receipt {
	chat := types.NewJID("15557770000", types.DefaultUserServer)
	return &events.Receipt{
		MessageSource: types.MessageSource{Chat: chat, Sender: chat},
		MessageIDs:    []string{id}, Timestamp: t0, Type: types.ReceiptTypeRead,
	}
}

// Relay stopped, messages and a receipt left unacknowledged: when relay
// comes back (its first heartbeat) the gateway drops the socket and
// reconnects once, says why once, and counts it apart from the reconnects
// after failures.
func TestRelayBackReconnectsOnceSoWhatsAppRedelivers(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.Off()
	for _, evt := range []any{textMsg("m-1", "15557770000", "a"), textMsg("m-2", "15557770001", "b"), readReceipt("3EB0R")} {
		if h.conn.emit(evt) {
			t.Fatalf("%T acknowledged with relay off", evt)
		}
	}
	h.rec.none(t)
	if err := h.relay.On(); err != nil {
		t.Fatal(err)
	}
	h.reconnectedForRedelivery()
	if h.conn.get(disconnects) != 1 {
		t.Fatalf("disconnects = %d, want 1", h.conn.get(disconnects))
	}
	// What WhatsApp redelivers on the new connection is stored, once.
	for _, evt := range []any{textMsg("m-1", "15557770000", "a"), textMsg("m-2", "15557770001", "b"), readReceipt("3EB0R")} {
		if !h.conn.emit(evt) {
			t.Fatalf("redelivered %T not acknowledged", evt)
		}
	}
	if got := len(h.relay.Messages()); got != 2 {
		t.Fatalf("relay stored %d messages, want 2", got)
	}
	if got := len(h.relay.Receipts()); got != 1 {
		t.Fatalf("relay stored %d receipts, want 1", got)
	}
	if lines := h.logs.Lines("relay is back: reconnecting so WhatsApp redelivers 3 unacknowledged"); len(lines) != 1 {
		t.Fatalf("redelivery log lines %q, want one:\n%s", lines, h.logs.String())
	}
	d := h.relayBeat("the redelivery reconnect in the heartbeat", func(d bus.GatewayDetails) bool {
		return d.RelayRedeliveryReconnects == 1 && d.WAState == bus.StateConnected
	})
	if d.Reconnects != 0 {
		t.Fatalf("reconnects = %d, want 0: a redelivery is not a lost connection", d.Reconnects)
	}
	// Nothing pending any more: relay's heartbeats change nothing.
	for range 3 {
		if err := h.relay.Beat(true); err != nil {
			t.Fatal(err)
		}
	}
	h.advance(2 * RedeliverEvery)
	h.probe()
	h.rec.none(t)
}

// Without a heartbeat, a store that succeeds after failures on the same
// connection is the sign: the next message relay stores brings back the
// ones it refused.
func TestStoreAfterRefusalsReconnectsForRedelivery(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.SetMode(testrelay.Refuse)
	refused := textMsg("m-1", "15557770000", "refused")
	if h.conn.emit(refused) {
		t.Fatal("acknowledged although relay refused")
	}
	h.relay.SetMode(testrelay.Store)
	h.rec.none(t)
	if !h.conn.emit(textMsg("m-2", "15557770000", "stored")) {
		t.Fatal("stored message not acknowledged")
	}
	h.reconnectedForRedelivery()
	if !h.conn.emit(refused) {
		t.Fatal("redelivery not acknowledged")
	}
	if ids := storedIDs(h); ids != "m-2,m-1" {
		t.Fatalf("relay stored %s, want m-2 then m-1", ids)
	}
}

// A relay that comes back within the minute of the last redelivery
// reconnect does not make the socket flap: the next one waits for the
// minute to be over, and then happens once.
func TestRedeliveryReconnectsAtMostOncePerMinute(t *testing.T) {
	h := start(t)
	h.connected()
	flap := func(id string) time.Time {
		t.Helper()
		h.relay.Off()
		if h.conn.emit(textMsg(id, "15557770000", "x")) {
			t.Fatalf("%s acknowledged with relay off", id)
		}
		at := h.clock.Now()
		if err := h.relay.On(); err != nil {
			t.Fatal(err)
		}
		return at
	}
	first := flap("m-1")
	if e := h.reconnectedForRedelivery(); !e.At.Equal(first) {
		t.Fatalf("first reconnect at %v, want at once (%v)", e.At, first)
	}
	h.conn.emit(textMsg("m-1", "15557770000", "x"))

	flap("m-2")
	h.advanceUntil(time.Second, "a minute after the first", func() bool {
		return !h.clock.Now().Before(first.Add(RedeliverEvery - time.Second))
	})
	h.rec.none(t)
	e := h.advanceToNext(time.Second, bus.ConnReconnecting)
	if e.At.Before(first.Add(RedeliverEvery)) {
		t.Fatalf("second redelivery reconnect at %v, within the minute of %v", e.At, first)
	}
	h.reconnect()
	h.conn.emit(textMsg("m-2", "15557770000", "x"))
	if ids := storedIDs(h); ids != "m-1,m-2" {
		t.Fatalf("relay stored %s, want m-1,m-2 once each", ids)
	}
	h.relayBeat("two redelivery reconnects", func(d bus.GatewayDetails) bool { return d.RelayRedeliveryReconnects == 2 })
}

// A heartbeat saying ok while relay keeps refusing brings one reconnect,
// not one a minute; relay seen down (database_ok false) and up again is
// believed again.
func TestRelayHeartbeatIsBelievedOncePerOutage(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.SetMode(testrelay.Refuse)
	msg := textMsg("m-1", "15557770000", "x")
	if h.conn.emit(msg) {
		t.Fatal("acknowledged although relay refused")
	}
	if err := h.relay.Beat(false); err != nil {
		t.Fatal(err)
	}
	h.advance(RedeliverEvery)
	h.rec.none(t)
	if err := h.relay.Beat(true); err != nil { // stale: still refusing
		t.Fatal(err)
	}
	h.reconnectedForRedelivery()
	if h.conn.emit(msg) {
		t.Fatal("acknowledged although relay refused")
	}
	for range 5 {
		if err := h.relay.Beat(true); err != nil {
			t.Fatal(err)
		}
		h.advance(RedeliverEvery)
	}
	h.rec.none(t)

	if err := h.relay.Beat(false); err != nil {
		t.Fatal(err)
	}
	h.relay.SetMode(testrelay.Store)
	if err := h.relay.Beat(true); err != nil {
		t.Fatal(err)
	}
	h.reconnectedForRedelivery()
	if !h.conn.emit(msg) {
		t.Fatal("redelivery not acknowledged")
	}
	h.relayBeat("two redelivery reconnects", func(d bus.GatewayDetails) bool { return d.RelayRedeliveryReconnects == 2 })
}

// A connection already lost redelivers by itself: relay coming back while
// the gateway waits to reconnect adds no reconnect, and the new connection
// starts with nothing pending.
func TestNoRedeliveryReconnectWhileNotConnected(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.Off()
	if h.conn.emit(textMsg("m-1", "15557770000", "x")) {
		t.Fatal("acknowledged with relay off")
	}
	h.conn.emit(&events.Disconnected{})
	h.rec.next(t, bus.ConnDisconnected)
	h.rec.next(t, bus.ConnReconnecting)
	if err := h.relay.On(); err != nil {
		t.Fatal(err)
	}
	h.reconnect()
	if !h.conn.emit(textMsg("m-1", "15557770000", "x")) {
		t.Fatal("redelivery not acknowledged")
	}
	h.advance(2 * RedeliverEvery)
	h.probe()
	h.rec.none(t)
	if n := h.logs.Count("relay is back"); n != 0 {
		t.Fatalf("%d redelivery lines, want none", n)
	}
}
