package gateway

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// msgInIDs are the ids seen on P.msg.in so far.
func (h *harness) msgInIDs() []string {
	var out []string
	for _, m := range on[bus.MsgIn](h.rec, h.subj.MsgIn()) {
		out = append(out, m.ID)
	}
	return out
}

// emitAsync emits evt on its own goroutine (a handler that waits for
// relay); the handler's result comes on the channel.
func (h *harness) emitAsync(evt any) <-chan bool {
	out := make(chan bool, 1)
	go func() { out <- h.conn.emit(evt) }()
	return out
}

// relayBeat waits for a heartbeat whose details satisfy cond, moving the
// clock a heartbeat interval at a time.
func (h *harness) relayBeat(what string, cond func(bus.GatewayDetails) bool) bus.GatewayDetails {
	h.t.Helper()
	var got bus.GatewayDetails
	h.advanceUntil(bus.HeartbeatInterval, what, func() bool {
		_, d, ok := h.rec.lastBeat(h.subj)
		got = d
		return ok && cond(d)
	})
	return got
}

// A message is acknowledged (the handler reports success) only when relay
// answered ok; no relay, a refusal or a timeout leave it unacknowledged,
// publish nothing, and count in the heartbeat. Once relay stores again the
// redelivered message is acknowledged and stored once.
func TestMessageAcknowledgedOnlyAfterRelayStoredIt(t *testing.T) {
	tests := []struct {
		name     string
		fail     func(h *harness)
		await    func(h *harness, acked <-chan bool) bool
		reason   string
		recovery func(h *harness)
	}{
		{
			name:   "relay not running",
			fail:   func(h *harness) { h.relay.Stop() },
			reason: "relay not running",
			recovery: func(h *harness) {
				h.relay = testrelay.Start(h.t, h.nc, "Test-Bot")
			},
		},
		{
			name:     "relay refuses",
			fail:     func(h *harness) { h.relay.SetMode(testrelay.Refuse) },
			reason:   "relay refused: " + testrelay.RefuseError,
			recovery: func(h *harness) { h.relay.SetMode(testrelay.Store) },
		},
		{
			name: "relay does not answer",
			fail: func(h *harness) { h.relay.SetMode(testrelay.Silent) },
			await: func(h *harness, acked <-chan bool) bool {
				testwait.For(h.t, 5*time.Second, "the store request", func() bool { return h.relay.Requests() == 1 })
				h.advance(DefaultRelayTimeout - time.Millisecond)
				select {
				case r := <-acked:
					h.t.Fatalf("answered %v before RelayTimeout", r)
				default:
				}
				var r bool
				h.advanceUntil(time.Millisecond, "the handler to give up", func() bool {
					select {
					case r = <-acked:
						return true
					default:
						return false
					}
				})
				return r
			},
			reason:   "no answer from relay within 10s",
			recovery: func(h *harness) { h.relay.SetMode(testrelay.Store) },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			tt.fail(h)
			msg := textMsg("m-1", "15557770000", "hello")
			acked := h.emitAsync(msg)
			var ok bool
			if tt.await != nil {
				ok = tt.await(h, acked)
			} else {
				ok = <-acked
			}
			if ok {
				t.Fatal("acknowledged although relay did not store it")
			}
			d := h.relayBeat("relay_unacked in the heartbeat", func(d bus.GatewayDetails) bool { return d.RelayUnacked == 1 })
			if !strings.Contains(d.LastRelayError, tt.reason) || d.LastRelayErrorAt == nil {
				t.Fatalf("heartbeat relay fields = %q at %v, want %q", d.LastRelayError, d.LastRelayErrorAt, tt.reason)
			}
			if n := len(h.relay.Messages()); n != 0 {
				t.Fatalf("relay stored %d messages", n)
			}

			// WhatsApp delivers it again once relay is back.
			tt.recovery(h)
			if !h.conn.emit(msg) {
				t.Fatal("the redelivery was not acknowledged")
			}
			h.probe()
			if ids := h.msgInIDs(); len(ids) != 2 || ids[0] != "m-1" {
				t.Fatalf("msg.in ids = %v, want m-1 once then the probe", ids)
			}
			if !strings.Contains(h.logs.String(), "relay storing again") {
				t.Errorf("no recovery line in the log:\n%s", h.logs.String())
			}
		})
	}
}

// A relay outage does not flood the log: one line when it begins, at most
// one summary a minute while it lasts.
func TestRelayOutageLogIsCollapsed(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.Stop()
	for i := range 50 {
		if h.conn.emit(textMsg(fmt.Sprintf("m%d", i), "15557770000", "x")) {
			t.Fatal("acknowledged with no relay")
		}
	}
	h.advance(relayLogEvery)
	h.conn.emit(textMsg("late", "15557770000", "x"))
	if n := h.logs.Count("relay did not store"); n != 1 {
		t.Errorf("%d first-failure lines, want 1", n)
	}
	if lines := h.logs.Lines("relay still not storing"); len(lines) != 1 || !strings.Contains(lines[0], "unacked=51") {
		t.Errorf("summary lines = %q, want one saying unacked=51", lines)
	}
	d := h.relayBeat("51 unacked", func(d bus.GatewayDetails) bool { return d.RelayUnacked == 51 })
	if d.LastRelayError == "" {
		t.Fatalf("no last_relay_error: %+v", d)
	}
}

// An owner command runs once per message: not when the store failed (the
// message comes again), and not on a redelivery relay already had.
func TestOwnerCommandRunsOncePerStoredMessage(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = false })
	h.connected()
	ping := ownerMsg("own-1", ".ping", false)

	h.relay.SetMode(testrelay.Refuse)
	if h.conn.emit(ping) {
		t.Fatal("acknowledged although relay refused")
	}
	// Relay is back: the gateway reconnects, and WhatsApp redelivers.
	h.relay.SetMode(testrelay.Store)
	if err := h.relay.Beat(true); err != nil {
		t.Fatal(err)
	}
	h.reconnectedForRedelivery()
	if !h.conn.emit(ping) { // the redelivery, stored now
		t.Fatal("redelivery not acknowledged")
	}
	if !h.conn.emit(ping) { // again, its ack lost: relay says Duplicate
		t.Fatal("duplicate not acknowledged")
	}
	h.replies(1)
	h.probe()
	// The worker runs replies in order; one more command proves the
	// duplicate queued nothing before it.
	if !h.conn.emit(ownerMsg("own-2", ".status", false)) {
		t.Fatal("status not acknowledged")
	}
	got := h.replies(2)
	if len(got) != 2 || !strings.HasPrefix(got[0].Text, "pong") || !strings.HasPrefix(got[1].Text, "state:") {
		t.Fatalf("replies = %+v, want one pong then the status", got)
	}
}

// Receipts go to relay as bus.Receipt and are acknowledged once stored; a
// retry receipt is acknowledged whatever relay says.
func TestReceiptsHandedToRelay(t *testing.T) {
	h := start(t)
	h.connected()
	chat := types.NewJID("15557770000", types.DefaultUserServer)
	sender := chat
	sender.Device = 2
	rc := func(typ types.ReceiptType, ids ...string) *events.Receipt {
		return &events.Receipt{
			MessageSource: types.MessageSource{Chat: chat, Sender: sender},
			MessageIDs:    ids, Timestamp: t0.Add(-time.Minute), Type: typ,
		}
	}
	if !h.conn.emit(rc(types.ReceiptTypeDelivered, "3EB0A", "3EB0B")) || !h.conn.emit(rc(types.ReceiptTypeRead, "3EB0A")) {
		t.Fatal("receipt not acknowledged")
	}
	got := h.relay.Receipts()
	if len(got) != 2 {
		t.Fatalf("relay got %d receipts", len(got))
	}
	want := bus.Receipt{Chat: chat.String(), Sender: chat.String(), IDs: []string{"3EB0A", "3EB0B"},
		Type: "delivered", Timestamp: t0.Add(-time.Minute)}
	want.Stamp("Test-Bot", t0)
	if g := got[0]; g.Chat != want.Chat || g.Sender != want.Sender || strings.Join(g.IDs, ",") != "3EB0A,3EB0B" ||
		g.Type != want.Type || !g.Timestamp.Equal(want.Timestamp) || g.Event != want.Event {
		t.Fatalf("receipt = %+v\nwant %+v", g, want)
	}
	if got[1].Type != "read" {
		t.Fatalf("second receipt type %q", got[1].Type)
	}

	h.relay.Stop()
	if h.conn.emit(rc(types.ReceiptTypeRead, "3EB0C")) {
		t.Fatal("read receipt acknowledged with no relay")
	}
	if !h.conn.emit(rc(types.ReceiptTypeRetry, "3EB0D")) {
		t.Fatal("retry receipt left unacknowledged: whatsmeow would resend the message again")
	}
}

// The gateway neither publishes P.msg.in nor answers P.msg.send: relay
// does both.
func TestGatewayLeavesMsgInAndMsgSendToRelay(t *testing.T) {
	h := start(t)
	h.connected()
	h.relay.Stop()
	h.conn.emit(textMsg("lonely", "15557770000", "hi"))
	_, err := h.nc.Request(h.subj.MsgSend(), []byte(`{"to":"15551234567","text":"hi"}`), 2*time.Second)
	if !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("msg.send with no relay: %v, want no responders", err)
	}
	// A probe through a fresh relay: whatever the gateway had published
	// would be on the recorder by now.
	h.relay = testrelay.Start(t, h.nc, "Test-Bot")
	h.probe()
	if ids := h.msgInIDs(); len(ids) != 1 || !strings.HasPrefix(ids[0], "probe-") {
		t.Fatalf("msg.in ids = %v, want only the probe (stored by relay)", ids)
	}
	if n := len(h.conn.sentMsgs()); n != 0 {
		t.Fatalf("sent %d", n)
	}
}
