package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

func TestSubjects(t *testing.T) {
	tests := []struct{ session, prefix string }{
		{"BLACKSKY-MD", "blacksky.blacksky-md"},
		{"My Bot.1", "blacksky.my_bot_1"},
		{"a*b>c", "blacksky.a_b_c"},
		{"snake_case-OK9", "blacksky.snake_case-ok9"},
	}
	for _, tt := range tests {
		if got := bus.NewSubjects(tt.session).Prefix; got != tt.prefix {
			t.Errorf("NewSubjects(%q).Prefix = %q, want %q", tt.session, got, tt.prefix)
		}
	}
	s := bus.NewSubjects("BLACKSKY-MD")
	want := map[string]string{
		s.Conn(bus.ConnReconnecting):      "blacksky.blacksky-md.conn.reconnecting",
		s.Heartbeat("gateway"):            "blacksky.blacksky-md.heartbeat.gateway",
		s.BackupRequest():                 "blacksky.blacksky-md.backup.request",
		s.BackupDone():                    "blacksky.blacksky-md.backup.done",
		s.BackupFailed():                  "blacksky.blacksky-md.backup.failed",
		s.SessionRestoreFor("web-1-ab12"): "blacksky.blacksky-md.session.restore.web-1-ab12",
		s.MsgIn():                         "blacksky.blacksky-md.msg.in",
		s.MsgSend():                       "blacksky.blacksky-md.msg.send",
	}
	for got, w := range want {
		if got != w {
			t.Errorf("got %q, want %q", got, w)
		}
	}
	if bus.Kind(s.Conn("qr")) != "qr" {
		t.Errorf("Kind")
	}
}

func TestDecodeBackupRequest(t *testing.T) {
	tests := []struct {
		body   string
		reason string
		errHas string
	}{
		{"", "manual", ""},
		{"  \n", "manual", ""},
		{`{}`, "manual", ""},
		{`{"reason":"manual"}`, "manual", ""},
		{`{"reason":"restore-point"}`, "restore-point", ""},
		{`{"reason":"x","extra":1}`, "", "unknown field"},
		{`{"reason":`, "", "bad JSON"},
		{`[1]`, "", "JSON object"},
		{`"manual"`, "", "JSON object"},
		{`{"reason":"scheduled"}`, "scheduled", ""},
		{`{"reason":"a b"}`, "", "one of manual, scheduled, restore-point"},
		{`{"reason":"reason-7"}`, "", "one of"},
		{`{"reason":"shutdown"}`, "", "one of"},
		{`{"reason":"paired"}`, "", "one of"},
		{`{"reason":5}`, "", "bad JSON"},
		{`{} {}`, "", "after the object"},
		{`{"reason":"` + strings.Repeat("a", 40) + `"}`, "", "one of"},
	}
	for _, tt := range tests {
		r, err := bus.DecodeBackupRequest([]byte(tt.body))
		if tt.errHas != "" {
			if err == nil || !strings.Contains(err.Error(), tt.errHas) {
				t.Errorf("%q: want error with %q, got %v", tt.body, tt.errHas, err)
			}
			continue
		}
		if err != nil || r.Reason != tt.reason {
			t.Errorf("%q: got %+v, %v; want reason %q", tt.body, r, err, tt.reason)
		}
	}
}

func TestDecodeMsgSend(t *testing.T) {
	tests := []struct {
		body   string
		errHas string
	}{
		{`{"to":"15551234567","text":"hi"}`, ""},
		{`{"to":"15551234567@s.whatsapp.net","text":"hi"}`, ""},
		{`{"text":"hi"}`, `"to" is required`},
		{`{"to":"1555"}`, `"text" is required`},
		{`{"to":"1","text":"hi","media":"x"}`, "unknown field"},
		{`not json`, "JSON object"},
		{``, "JSON object"},
		{`{"to":"1","text":"` + strings.Repeat("x", bus.MaxTextLen+1) + `"}`, "longer than"},
	}
	for _, tt := range tests {
		_, err := bus.DecodeMsgSend([]byte(tt.body))
		if tt.errHas == "" && err != nil {
			t.Errorf("%.40q: unexpected error %v", tt.body, err)
		}
		if tt.errHas != "" && (err == nil || !strings.Contains(err.Error(), tt.errHas)) {
			t.Errorf("%.40q: want error with %q, got %v", tt.body, tt.errHas, err)
		}
	}
}

func FuzzBackupRequestDecode(f *testing.F) {
	for _, s := range []string{"", "{}", `{"reason":"manual"}`, `{"reason":1}`, `{"a":1}`, "[", "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := bus.DecodeBackupRequest(data)
		if err == nil && r.Reason == "" {
			t.Fatalf("accepted %q without a reason", data)
		}
	})
}

// FuzzEventDecode: the strict event decoders never panic, and what they
// accept has a time and, for a conn event, the subject's kind.
func FuzzEventDecode(f *testing.F) {
	for _, s := range []string{"", "{}", `{"ok":true}`, `{"session":"s","at":"2026-01-01T00:00:00Z","kind":"standby"}`,
		`{"at":"2026-01-01T00:00:00Z","snapshot_id":1}`, `{"at":"2026-01-01T00:00:00Z","kind":"qr","x":1}`, "[", "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if ev, err := bus.DecodeConnEvent(bus.ConnStandby, data); err == nil && (ev.At.IsZero() || ev.Kind != bus.ConnStandby) {
			t.Fatalf("accepted %q as conn.standby: %+v", data, ev)
		}
		if ev, err := bus.DecodeBackupDone(data); err == nil && ev.At.IsZero() {
			t.Fatalf("accepted %q as backup.done without a time", data)
		}
		if ev, err := bus.DecodeBackupFailed(data); err == nil && ev.At.IsZero() {
			t.Fatalf("accepted %q as backup.failed without a time", data)
		}
	})
}

func startServer(t *testing.T, opts bus.ServerOptions) *bus.Server {
	t.Helper()
	srv, err := bus.StartServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return srv
}

func TestInProcessServerHasNoPort(t *testing.T) {
	srv := startServer(t, bus.ServerOptions{})
	if u := srv.ClientURL(); u != "" {
		t.Fatalf("in-process server listens on %q", u)
	}
	nc, err := srv.Connect("test", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sub, err := nc.SubscribeSync("x")
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.Publish(nc, "x", map[string]int{"n": 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(5 * time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestTokenIsRequiredOverTCP(t *testing.T) {
	srv := startServer(t, bus.ServerOptions{Listen: "127.0.0.1:0", Token: "t0ken-for-test"})
	url := srv.ClientURL()
	if url == "" || strings.HasSuffix(url, ":4222") {
		t.Fatalf("want a random TCP port, got %q", url)
	}
	if nc, err := nats.Connect(url, nats.Token("wrong")); err == nil {
		nc.Close()
		t.Fatal("a wrong token was accepted")
	}
	if nc, err := nats.Connect(url); err == nil {
		nc.Close()
		t.Fatal("no token was accepted")
	}
	nc, err := bus.Connect(url, "t0ken-for-test", "test", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestRequestWithoutResponderFailsFast(t *testing.T) {
	srv := startServer(t, bus.ServerOptions{})
	nc, err := srv.Connect("test", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var reply bus.RestoreReply
	start := time.Now()
	err = bus.Request(ctx, nc, "nobody.home", struct{}{}, &reply)
	if !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("want ErrNoResponders, got %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("no-responders should fail at once, not time out")
	}
}

func TestHeartbeaterBeatsOnTheClock(t *testing.T) {
	srv := startServer(t, bus.ServerOptions{})
	nc, err := srv.Connect("test", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	subj := bus.NewSubjects("S")
	sub, err := nc.SubscribeSync(subj.Heartbeat("gateway"))
	if err != nil {
		t.Fatal(err)
	}
	clock := clockwork.NewFakeClock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	h := &bus.Heartbeater{NC: nc, Subjects: subj, Session: "S", Service: "gateway", Instance: "i-1", Clock: clock,
		Beat: func() (string, any) {
			return bus.StateConnected, bus.GatewayDetails{WAState: bus.StateConnected, Reconnects: 2}
		}}
	go func() { done <- h.Run(ctx) }()

	next := func() bus.Heartbeat {
		t.Helper()
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var hb bus.Heartbeat
		if err := json.Unmarshal(m.Data, &hb); err != nil {
			t.Fatal(err)
		}
		return hb
	}
	first := next()
	if first.Service != "gateway" || first.Instance != "i-1" || first.State != "connected" || first.Session != "S" || first.UptimeS != 0 {
		t.Fatalf("first beat: %+v", first)
	}
	var d bus.GatewayDetails
	if err := json.Unmarshal(first.Details, &d); err != nil || d.Reconnects != 2 {
		t.Fatalf("details: %s %v", first.Details, err)
	}
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	clock.Advance(bus.HeartbeatInterval)
	if second := next(); second.UptimeS != 5 {
		t.Fatalf("second beat uptime %d, want 5", second.UptimeS)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// The reasons a backup.request may name are fixed: a caller changing the
// list it was given widens nothing.
func TestRequestReasonsCannotBeChangedByCallers(t *testing.T) {
	reasons := bus.RequestReasons()
	for i := range reasons {
		reasons[i] = "made-up"
	}
	if _, err := bus.DecodeBackupRequest([]byte(`{"reason":"made-up"}`)); err == nil {
		t.Fatal("a reason a caller wrote into the list was accepted")
	}
	if r, err := bus.DecodeBackupRequest([]byte(`{"reason":"scheduled"}`)); err != nil || r.Reason != bus.ReasonScheduled {
		t.Fatalf("scheduled: %+v, %v", r, err)
	}
	if got := bus.RequestReasons(); len(got) != 3 || got[0] != bus.ReasonManual {
		t.Fatalf("RequestReasons() = %v after a caller changed its copy", got)
	}
}

// FuzzRelayDecode: relay's strict decoders (P.relay.store, P.msg.replay,
// P.relay.retry, P.msg.send) never panic, and what they accept is within
// their bounds.
func FuzzRelayDecode(f *testing.F) {
	for _, s := range []string{`{"message":{"id":"A","chat":"c","at":"2026-03-01T12:00:00Z"}}`,
		`{"receipt":{"chat":"c","ids":["A"],"type":"read"}}`, `{"after_seq":3,"limit":10}`, ``, `{}`,
		`{"to":"1","text":"x","idempotency_key":"k","wait":false}`, `[]`, `{"message":null}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if r, err := bus.DecodeRelayStore(data); err == nil {
			if (r.Message == nil) == (r.Receipt == nil) {
				t.Fatalf("accepted %q with both or neither", data)
			}
			if r.Message != nil && (r.Message.ID == "" || r.Message.Chat == "" || len(r.Message.ID) > bus.MaxIDLen) {
				t.Fatalf("accepted message %+v", r.Message)
			}
			if r.Receipt != nil && (len(r.Receipt.IDs) == 0 || len(r.Receipt.IDs) > bus.MaxReceiptIDs) {
				t.Fatalf("accepted receipt %+v", r.Receipt)
			}
		}
		if r, err := bus.DecodeMsgReplay(data); err == nil && (r.AfterSeq < 0 || r.Limit < 0 || r.Limit > bus.MaxReplayLimit) {
			t.Fatalf("accepted replay %+v", r)
		}
		_ = bus.DecodeRelayRetry(data)
		if m, err := bus.DecodeMsgSend(data); err == nil {
			if m.To == "" || m.Text == "" || len(m.IdempotencyKey) > bus.MaxIdempotencyLen || strings.ContainsAny(m.IdempotencyKey, " \t\n") {
				t.Fatalf("accepted send %+v", m)
			}
		}
	})
}
