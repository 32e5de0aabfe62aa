package gateway

import (
	"strings"
	"testing"
	"time"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// P.gateway.send (relay asking for one message now) validates, sends and
// answers as P.msg.send did.
func TestGatewaySend(t *testing.T) {
	h := start(t)
	h.rec.next(t, bus.ConnConnecting)

	notConnected := h.request(`{"to":"15551234567","text":"hi"}`)
	if notConnected.OK || !strings.Contains(notConnected.Error, "not connected") {
		t.Fatalf("before login: %+v", notConnected)
	}
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)

	tests := []struct {
		name, body, wantErr string
	}{
		{"bad JSON", `{"to":`, "bad JSON"},
		{"not an object", `"hello"`, "JSON object"},
		{"unknown field", `{"to":"15551234567","text":"x","media":"y"}`, "unknown field"},
		{"missing text", `{"to":"15551234567"}`, `"text" is required`},
		{"unknown recipient form", `{"to":"bob","text":"x"}`, "unknown recipient form"},
		{"group JID with letters", `{"to":"abc@g.us","text":"x"}`, "unknown recipient form"},
		{"success", `{"to":"+1 555 123 4567","text":"hello"}`, ""},
		{"success by JID", `{"to":"120363025246125486@g.us","text":"hi all"}`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := h.request(tt.body)
			if tt.wantErr != "" {
				if r.OK || !strings.Contains(r.Error, tt.wantErr) {
					t.Fatalf("reply = %+v, want error containing %q", r, tt.wantErr)
				}
				return
			}
			if !r.OK || r.ID == "" || r.Timestamp == nil || !r.Timestamp.Equal(t0.Add(time.Minute)) {
				t.Fatalf("reply = %+v, want ok with id and timestamp", r)
			}
		})
	}
	sent := h.conn.sentMsgs()
	if len(sent) != 2 || sent[0].To != types.NewJID("15551234567", types.DefaultUserServer) || sent[0].Text != "hello" ||
		sent[1].To.Server != types.GroupServer {
		t.Fatalf("sent = %+v", sent)
	}
}

func TestGatewaySendFailureIsReported(t *testing.T) {
	h := start(t, func(_ *Config, c *fakeConn) { c.sendErr = errDial })
	h.connected()
	r := h.request(`{"to":"15551234567","text":"hello"}`)
	if r.OK || !strings.Contains(r.Error, "send failed") {
		t.Fatalf("reply = %+v", r)
	}
}

// An incoming message reaches relay as its P.msg.in payload, stamped with
// the session and the gateway's time; relay adds the seq.
func TestMessageHandedToRelayAsMsgIn(t *testing.T) {
	h := start(t)
	h.connected()
	lid := types.NewJID("987654321", types.HiddenUserServer)
	lid.Device = 3
	group := types.NewJID("120363025246125486", types.GroupServer)
	e := &events.Message{
		Info: types.MessageInfo{
			MessageSource: types.MessageSource{Chat: group, Sender: lid, IsGroup: true},
			ID:            "3EB0C0FFEE",
			PushName:      "Ada",
			Timestamp:     t0.Add(-time.Second),
		},
		Message: textProto("hello group"),
	}
	if !h.conn.emit(e) {
		t.Fatal("message not acknowledged")
	}
	got := h.relay.Messages()
	want := bus.MsgIn{ID: "3EB0C0FFEE", Chat: group.String(), Sender: "987654321@lid", PushName: "Ada",
		Timestamp: t0.Add(-time.Second), Type: "text", Text: "hello group", Seq: 1}
	want.Stamp("Test-Bot", t0)
	if len(got) != 1 || got[0] != want {
		t.Fatalf("relay stored %+v\nwant %+v", got, want)
	}
}
