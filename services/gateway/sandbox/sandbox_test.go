package sandbox_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestLinkPairsTheGatewayThroughWhatsmeowsStore(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	r.rec.next(t, bus.ConnConnecting)
	qr := r.rec.next(t, bus.ConnQR)
	if parts := strings.Split(qr.Code, ","); len(parts) != 4 || !strings.HasPrefix(parts[0], "2@") {
		t.Fatalf("QR code %q: want ref,noise,identity,adv", qr.Code)
	}
	if got := qr.ExpiresAt.Sub(qr.At); got != 60*time.Second {
		t.Errorf("first QR code lives %s, want 60s", got)
	}
	jid, err := r.srv.Link(t.Context(), "15550009999")
	if err != nil {
		t.Fatal(err)
	}
	if jid.User != "15550009999" {
		t.Errorf("linked %s, want the number asked for", jid)
	}
	r.rec.next(t, bus.ConnPaired)
	if e := r.rec.next(t, bus.ConnConnected); e.JID != jid.String() {
		t.Errorf("connected as %q, want %q", e.JID, jid)
	}
	if _, err := r.srv.Link(t.Context(), ""); err == nil || !sandbox.IsBadRequest(err) {
		t.Errorf("second link: %v, want a refusal", err)
	}
	db := storeDB(t, filepath.Join(dir, "session.db"))
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_device WHERE jid = ?`, jid.String()); n != 1 {
		t.Errorf("device rows for %s: %d, want 1", jid, n)
	}
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_pre_keys WHERE uploaded`); n != 812 {
		t.Errorf("uploaded pre-keys after linking: %d, want whatsmeow's first upload of 812", n)
	}
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_app_state_version`); n != 5 {
		t.Errorf("app state versions: %d, want 5", n)
	}
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_lid_map`); n != 1 {
		t.Errorf("lid mappings: %d, want 1", n)
	}
}

func TestQRCodesRotateOnWhatsAppsSchedule(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.rec.next(t, bus.ConnConnecting)
	first := r.rec.next(t, bus.ConnQR)
	ttl := first.ExpiresAt.Sub(first.At)
	codes := map[string]bool{first.Code: true}
	for i := 1; i < 6; i++ {
		var e bus.ConnEvent
		r.advanceUntil(ttl, "QR code "+string(rune('1'+i)), func() bool { return r.rec.ahead() > 0 })
		e = r.rec.next(t, bus.ConnQR)
		ttl = e.ExpiresAt.Sub(e.At)
		if ttl != 20*time.Second {
			t.Errorf("QR code %d lives %s, want 20s", i+1, ttl)
		}
		codes[e.Code] = true
	}
	if len(codes) != 6 {
		t.Errorf("%d distinct codes, want 6", len(codes))
	}
	// All six expired: the gateway starts a fresh round with new codes.
	r.clock.Advance(ttl)
	r.rec.next(t, bus.ConnReconnecting)
	r.advanceUntil(time.Second, "a new pairing round", func() bool { return r.rec.ahead() > 1 })
	r.rec.next(t, bus.ConnConnecting)
	if e := r.rec.next(t, bus.ConnQR); codes[e.Code] {
		t.Error("the new round repeats an old code")
	}
}

func TestEveryMessageTypeReachesMsgIn(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	lat, long := 52.52, 13.405
	cases := []struct {
		in       sandbox.Inject
		typ, txt string
	}{
		{sandbox.Inject{Type: sandbox.TypeText, Content: sandbox.Content{Text: "hello"}}, "text", "hello"},
		{sandbox.Inject{Type: sandbox.TypeImage, Content: sandbox.Content{Text: "a cat"}}, "image", "a cat"},
		{sandbox.Inject{Type: sandbox.TypeVideo, Content: sandbox.Content{Text: "a clip"}}, "video", "a clip"},
		{sandbox.Inject{Type: sandbox.TypeAudio}, "audio", ""},
		{sandbox.Inject{Type: sandbox.TypeDocument, Content: sandbox.Content{Text: "the report", FileName: "r.pdf"}}, "document", "the report"},
		{sandbox.Inject{Type: sandbox.TypeSticker}, "sticker", ""},
		{sandbox.Inject{Type: sandbox.TypeReaction, Content: sandbox.Content{Text: "👍", Target: "ABC"}}, "reaction", "👍"},
		{sandbox.Inject{Type: sandbox.TypeLocation, HasLocation: true, Content: sandbox.Content{Latitude: lat, Longitude: long}}, "location", ""},
		{sandbox.Inject{Type: sandbox.TypeContact, Content: sandbox.Content{Text: "Alice"}}, "contact", ""},
		{sandbox.Inject{Type: sandbox.TypePoll, Content: sandbox.Content{Text: "Lunch?", Options: []string{"yes", "no"}}}, "poll", "Lunch?"},
		{sandbox.Inject{Type: sandbox.TypeRevoke, Content: sandbox.Content{Target: "ABC"}}, "protocol", ""},
	}
	for i, c := range cases {
		c.in.From = "4915112345678"
		if i%2 == 1 {
			c.in.Group = "120363025246125486"
		}
		ids := r.inject(c.in)
		m := r.msgIn(ids...)[ids[0]]
		if m.Type != c.typ || m.Text != c.txt {
			t.Errorf("%s: msg.in type %q text %q, want %q %q", c.in.Type, m.Type, m.Text, c.typ, c.txt)
		}
		if m.Sender != "4915112345678@s.whatsapp.net" || m.FromMe || m.PushName != "Contact 5678" {
			t.Errorf("%s: sender %q from_me %v push name %q", c.in.Type, m.Sender, m.FromMe, m.PushName)
		}
		wantChat := "4915112345678@s.whatsapp.net"
		if c.in.Group != "" {
			wantChat = "120363025246125486@g.us"
		}
		if m.Chat != wantChat {
			t.Errorf("%s: chat %q, want %q", c.in.Type, m.Chat, wantChat)
		}
		if !m.Timestamp.Equal(t0) {
			t.Errorf("%s: timestamp %s, want the inject's time %s", c.in.Type, m.Timestamp, t0)
		}
	}
	if _, err := r.srv.Inject(t.Context(), sandbox.Inject{From: "123456", Type: "hologram"}); !sandbox.IsBadRequest(err) {
		t.Errorf("unknown type: %v, want a bad request", err)
	}
}

// TestFaultsDriveTheGatewaysPolicy: each fault yields the events and the
// waits the gateway's policy table (package gateway's doc) gives the real
// whatsmeow events. Backoff: 1 s to 10 s, jitter 0.5, so attempt 1 waits
// 1.5 s and attempt 2 2.5 s.
func TestFaultsDriveTheGatewaysPolicy(t *testing.T) {
	reconnected := func(r *rig, wait time.Duration) {
		r.t.Helper()
		r.clock.Advance(wait)
		r.rec.next(r.t, bus.ConnConnecting)
		r.rec.next(r.t, bus.ConnConnected)
	}
	loginAgain := func(t *testing.T, r *rig) {
		t.Helper()
		r.rec.none(t) // armed, not raised on the open socket
		r.fault(sandbox.Fault{Kind: sandbox.FaultDisconnect})
		r.rec.next(t, bus.ConnDisconnected)
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(1500 * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
	}
	t.Run("disconnect", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultDisconnect})
		r.rec.next(t, bus.ConnDisconnected)
		if e := r.rec.next(t, bus.ConnReconnecting); e.Attempt != 1 || e.DelayMS != 1500 {
			t.Errorf("reconnecting %+v, want attempt 1 after 1.5s", e)
		}
		reconnected(r, 1500*time.Millisecond)
	})
	t.Run("stream_replaced", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultStreamReplaced})
		r.rec.next(t, bus.ConnStreamReplaced)
		if e := r.rec.next(t, bus.ConnReconnecting); e.DelayMS != gateway.DefaultStreamReplacedWait.Milliseconds() {
			t.Errorf("reconnecting %+v, want the stream-replaced wait", e)
		}
		r.clock.Advance(gateway.DefaultStreamReplacedWait - time.Second)
		r.rec.none(t)
		reconnected(r, time.Second)
	})
	t.Run("logged_out", func(t *testing.T) {
		dir := t.TempDir()
		r := newRig(t, dir)
		jid := r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultLoggedOut})
		if e := r.rec.next(t, bus.ConnLoggedOut); e.Reason != "401: logged out from another device" {
			t.Errorf("logged_out reason %q, want whatsmeow's 401", e.Reason)
		}
		e := r.rec.next(t, bus.ConnReconnecting)
		if n := count(t, storeDB(t, filepath.Join(dir, "session.db")), `SELECT count(*) FROM whatsmeow_device`); n != 0 {
			t.Errorf("device rows after logout: %d, want 0 (whatsmeow deletes the device)", n)
		}
		r.clock.Advance(time.Duration(e.DelayMS) * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnQR) // a fresh device pairs anew
		if again := r.linked2(); again == jid {
			t.Errorf("linked again as the logged-out %s, want a new device", again)
		}
	})
	t.Run("temporary_ban", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultTemporaryBan, Code: 102, Expire: 30 * time.Minute})
		loginAgain(t, r) // 1.5 s of backoff: the ban has 29m58.5s left, said in whole seconds
		left := 30*time.Minute - time.Second
		ban := r.rec.next(t, bus.ConnTemporaryBan)
		if ban.Code != "102" || ban.ExpiresAt == nil || ban.ExpiresAt.Sub(ban.At) != left {
			t.Errorf("temporary_ban %+v, want code 102 expiring in %s", ban, left)
		}
		if e := r.rec.next(t, bus.ConnReconnecting); e.DelayMS != left.Milliseconds() {
			t.Errorf("reconnecting %+v, want after the ban", e)
		}
		reconnected(r, left)
	})
	t.Run("temporary_ban without expiry meets the ban again on connect", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultTemporaryBan})
		loginAgain(t, r)
		if ban := r.rec.next(t, bus.ConnTemporaryBan); ban.ExpiresAt != nil || ban.Code != "101" {
			t.Errorf("temporary_ban %+v, want code 101 without expiry", ban)
		}
		if e := r.rec.next(t, bus.ConnReconnecting); e.DelayMS != gateway.DefaultBanFallbackWait.Milliseconds() {
			t.Errorf("reconnecting %+v, want the fallback wait", e)
		}
		r.fault(sandbox.Fault{Kind: sandbox.FaultTemporaryBan, Expire: 2 * time.Hour})
		r.clock.Advance(gateway.DefaultBanFallbackWait)
		r.rec.next(t, bus.ConnConnecting)
		if ban := r.rec.next(t, bus.ConnTemporaryBan); ban.ExpiresAt == nil || ban.ExpiresAt.Sub(ban.At) != time.Hour {
			t.Errorf("temporary_ban on connect %+v, want the hour left", ban)
		}
		r.rec.next(t, bus.ConnReconnecting)
		reconnected(r, time.Hour)
	})
	t.Run("client_outdated: the gateway presents the version offered and logs in", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		versions := r.srv.Versions()
		old := versions.Current()
		r.fault(sandbox.Fault{Kind: sandbox.FaultClientOutdated})
		offered, err := versions.Latest(t.Context())
		if err != nil || offered == old {
			t.Fatalf("offered %q (%v), want a version newer than %q", offered, err, old)
		}
		r.rec.none(t) // said only in answer to a login
		r.fault(sandbox.Fault{Kind: sandbox.FaultDisconnect})
		r.rec.next(t, bus.ConnDisconnected)
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(1500 * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnClientOutdated)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnConnected)
		if cur := versions.Current(); cur != offered {
			t.Errorf("presenting %q, want the offered %q", cur, offered)
		}
	})
	t.Run("client_outdated for the offered version too stops the gateway", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultClientOutdated, Count: 2})
		r.fault(sandbox.Fault{Kind: sandbox.FaultDisconnect})
		r.rec.next(t, bus.ConnDisconnected)
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(1500 * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnClientOutdated)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnClientOutdated)
		r.clock.Advance(2 * time.Hour)
		r.rec.none(t) // no retry until restarted with a newer build
	})
	// loginAgain drops the socket so the gateway logs in again: WhatsApp
	// answers only a login with a <failure> node.
	t.Run("connect_failure 503 closes the socket at login", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultConnectFailure, Count: 2})
		loginAgain(t, r)
		r.rec.next(t, bus.ConnDisconnected) // whatsmeow: no ConnectFailure for 5xx
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(2500 * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnDisconnected) // count 2: the next login fails too
		if e := r.rec.next(t, bus.ConnReconnecting); e.Attempt != 3 {
			t.Errorf("reconnecting %+v, want attempt 3", e)
		}
		r.clock.Advance(10 * time.Second)
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnConnected)
	})
	t.Run("connect_failure of an unmapped reason", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultConnectFailure, Code: 409, Message: "try later"})
		loginAgain(t, r)
		if e := r.rec.next(t, bus.ConnConnectFailure); e.Reason != "409: client user agent was rejected (try later)" {
			t.Errorf("connect_failure reason %q", e.Reason)
		}
		if e := r.rec.next(t, bus.ConnReconnecting); e.Attempt != 2 || e.DelayMS != 2500 {
			t.Errorf("reconnecting %+v, want attempt 2 after 2.5s", e)
		}
		reconnected(r, 2500*time.Millisecond)
	})
	t.Run("connect_failure 403 is a logout on connect", func(t *testing.T) {
		dir := t.TempDir()
		r := newRig(t, dir)
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultConnectFailure, Code: 403})
		loginAgain(t, r)
		if e := r.rec.next(t, bus.ConnLoggedOut); !strings.HasPrefix(e.Reason, "403: ") {
			t.Errorf("logged_out reason %q, want 403", e.Reason)
		}
		r.rec.next(t, bus.ConnReconnecting)
		if n := count(t, storeDB(t, filepath.Join(dir, "session.db")), `SELECT count(*) FROM whatsmeow_device`); n != 0 {
			t.Errorf("device rows: %d, want 0", n)
		}
	})
	t.Run("connect_failure refuses the reasons other faults own", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		for _, code := range []int{402, 405, 399, 600} {
			if err := r.srv.Fault(t.Context(), sandbox.Fault{Kind: sandbox.FaultConnectFailure, Code: code}); err == nil {
				t.Errorf("code %d accepted", code)
			}
		}
	})
	// firstTimeout: as whatsmeow's keepAliveLoop, the first ping after the
	// fault (20 to 30 s after the last answered one) times out 10 s later.
	firstTimeout := func(t *testing.T, r *rig, fault time.Time) {
		t.Helper()
		r.rec.none(t)
		r.advanceUntil(time.Second, "the first keepalive timeout", func() bool { return r.rec.ahead() > 0 })
		e := r.rec.next(t, bus.ConnKeepaliveTimeout)
		if after := e.At.Sub(fault); e.Attempt != 1 || after <= 10*time.Second || after > 41*time.Second {
			t.Errorf("keepalive_timeout %+v %s after the fault, want the first 10 to 40 s after it", e, after)
		}
	}
	t.Run("keepalive_timeout until the gateway drops the socket", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		fault := r.clock.Now()
		r.fault(sandbox.Fault{Kind: sandbox.FaultKeepaliveTimeout})
		firstTimeout(t, r, fault)
		var rec bus.ConnEvent
		r.advanceUntil(5*time.Second, "the gateway to give up on keepalives", func() bool {
			r.rec.mu.Lock()
			defer r.rec.mu.Unlock()
			for _, e := range r.rec.conns[r.rec.cursor:] {
				if e.Kind == bus.ConnReconnecting {
					rec = e
					return true
				}
			}
			return false
		})
		last := r.rec.skipTo(t, bus.ConnReconnecting)
		if rec.At.Sub(t0) <= gateway.DefaultKeepaliveMaxFail || last.Attempt != 1 {
			t.Errorf("reconnecting %+v: want attempt 1 once keepalives failed for over %s", rec, gateway.DefaultKeepaliveMaxFail)
		}
		r.advanceUntil(500*time.Millisecond, "connected again", func() bool { return r.rec.ahead() > 1 })
		r.rec.next(t, bus.ConnConnecting)
		r.rec.next(t, bus.ConnConnected)
	})
	t.Run("keepalive_timeout restored", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		fault := r.clock.Now()
		r.fault(sandbox.Fault{Kind: sandbox.FaultKeepaliveTimeout, Duration: time.Minute})
		firstTimeout(t, r, fault)
		r.advanceUntil(5*time.Second, "keepalive restored", func() bool {
			r.rec.mu.Lock()
			defer r.rec.mu.Unlock()
			return len(r.rec.conns) > 0 && r.rec.conns[len(r.rec.conns)-1].Kind == bus.ConnKeepaliveRestored
		})
		for r.rec.skipTo(t, bus.ConnKeepaliveRestored).Kind != bus.ConnKeepaliveRestored {
		}
		r.rec.none(t) // still connected
	})
	t.Run("dial_hang times out after 30 s", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
		r.rec.next(t, bus.ConnDisconnected)
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(1500 * time.Millisecond)
		dial := r.rec.next(t, bus.ConnConnecting)
		r.advanceUntil(time.Second, "the hung dial to time out", func() bool { return r.rec.ahead() > 0 })
		e := r.rec.next(t, bus.ConnReconnecting)
		if took := e.At.Sub(dial.At); e.Attempt != 2 || took < 30*time.Second || took > 31*time.Second {
			t.Errorf("reconnecting %+v %s after the dial began, want attempt 2 after 30 s", e, took)
		}
	})
	t.Run("dial_hang", func(t *testing.T) {
		r := newRig(t, t.TempDir())
		r.linked()
		r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
		r.rec.next(t, bus.ConnDisconnected)
		r.rec.next(t, bus.ConnReconnecting)
		r.clock.Advance(1500 * time.Millisecond)
		r.rec.next(t, bus.ConnConnecting)
		r.clock.Advance(10 * time.Second)
		r.rec.none(t) // hung in the dial
		r.fault(sandbox.Fault{Kind: sandbox.FaultRelease})
		if e := r.rec.next(t, bus.ConnReconnecting); e.Attempt != 2 {
			t.Errorf("after the released dial: %+v, want attempt 2", e)
		}
		reconnected(r, 2500*time.Millisecond)
	})
}

// linked2 links a rig that is already showing a QR code.
func (r *rig) linked2() string {
	r.t.Helper()
	jid, err := r.srv.Link(r.t.Context(), "")
	if err != nil {
		r.t.Fatalf("link: %v", err)
	}
	r.rec.next(r.t, bus.ConnPaired)
	r.rec.next(r.t, bus.ConnConnected)
	return jid.String()
}

// lossy loses the ack of the first delivery of messages with a chosen
// text after relay stored them, as a socket that drops between the
// handler and the ack would.
type lossy struct {
	*sandbox.Client
	mu   sync.Mutex
	lose map[string]bool // text -> lose its first ack
	lost map[string]bool // ids already lost once
}

func (l *lossy) OnEventWithSuccess(h func(any) bool) {
	l.Client.OnEventWithSuccess(func(evt any) bool {
		if !h(evt) {
			return false
		}
		m, ok := evt.(*events.Message)
		if !ok {
			return true
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.lose[m.Message.GetConversation()] && !l.lost[m.Info.ID] {
			l.lost[m.Info.ID] = true
			return false
		}
		return true
	})
}

// reconnect drops the socket and waits for the gateway to be back.
func (r *rig) reconnect() {
	r.t.Helper()
	r.fault(sandbox.Fault{Kind: sandbox.FaultDisconnect})
	r.rec.next(r.t, bus.ConnDisconnected)
	r.rec.next(r.t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(r.t, bus.ConnConnecting)
	r.rec.next(r.t, bus.ConnConnected)
}

// An unacknowledged message comes again after a reconnect, and only then.
// This one was stored by relay, its ack lost: its plaintext was still
// buffered (the handler reported failure), so it is dispatched again and
// relay recognises the duplicate: P.msg.in carries it once.
func TestUnackedMessageComesAgainAfterReconnect(t *testing.T) {
	l := &lossy{lose: map[string]bool{"lost ack": true}, lost: map[string]bool{}}
	r := newRig(t, t.TempDir(), func(r *rig) {
		r.wrap = func(c *sandbox.Client) gateway.Conn { l.Client = c; return l }
	})
	r.linked()
	lost := r.inject(sandbox.Inject{From: "15551230001", Content: sandbox.Content{Text: "lost ack"}})
	kept := r.inject(sandbox.Inject{From: "15551230002", Content: sandbox.Content{Text: "acked"}})
	r.msgIn(lost[0], kept[0])
	testwait.For(t, 5*time.Second, "the second message acked", func() bool {
		_, acked, err := r.srv.Deliveries(t.Context(), kept[0])
		return err == nil && acked
	})
	if n, acked, err := r.srv.Deliveries(t.Context(), lost[0]); err != nil || n != 1 || acked {
		t.Fatalf("the message whose ack was lost: %d deliveries, acked %v (%v); want 1, not acked", n, acked, err)
	}
	requests := r.relay.Requests()
	r.reconnect()
	testwait.For(t, 5*time.Second, "the redelivered message acked", func() bool {
		n, acked, err := r.srv.Deliveries(t.Context(), lost[0])
		return err == nil && acked && n == 2
	})
	if got := r.relay.Requests(); got != requests+1 {
		t.Errorf("relay asked %d more times, want once (the redelivery)", got-requests)
	}
	if n := len(r.relay.Messages()); n != 2 {
		t.Errorf("relay stored %d messages, want 2 (the redelivery is a duplicate)", n)
	}
	if n, _, _ := r.srv.Deliveries(t.Context(), kept[0]); n != 1 {
		t.Errorf("the acked message was delivered %d times, want once", n)
	}
}

// bufferRows counts the decrypted-event buffer's rows in the session store:
// with plaintext (handlers not yet successful) and hash only (processed).
func bufferRows(t *testing.T, r *rig) (plaintext, hashOnly int) {
	t.Helper()
	db := storeDB(t, filepath.Join(r.dir, "session.db"))
	return count(t, db, `SELECT count(*) FROM whatsmeow_event_buffer WHERE plaintext IS NOT NULL`),
		count(t, db, `SELECT count(*) FROM whatsmeow_event_buffer WHERE plaintext IS NULL`)
}

// A message relay could not store is not acknowledged; its plaintext stays
// in the decrypted-event buffer (as whatsmeow keeps it), it is not
// delivered again on the same socket, and after the next reconnect it is
// dispatched again from the buffer, stored and acknowledged; then only its
// hash stays.
func TestMessageWhoseStoreFailedComesAgainAfterReconnect(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	r.relay.SetMode(testrelay.Refuse)
	ids := r.inject(sandbox.Inject{From: "15551230010", Content: sandbox.Content{Text: "store me"}})
	testwait.For(t, 5*time.Second, "the refused store", func() bool { return r.relay.Requests() == 1 })
	// A later message on the same socket, refused too, proves the delivery
	// loop moved past the first without acknowledging it. (A stored one
	// would tell the gateway relay is back, and it would reconnect by
	// itself: see redeliver_test.go.)
	later := r.inject(sandbox.Inject{From: "15551230011", Content: sandbox.Content{Text: "later"}})
	testwait.For(t, 5*time.Second, "the later refused store", func() bool { return r.relay.Requests() == 2 })
	for _, id := range []string{ids[0], later[0]} {
		if n, acked, err := r.srv.Deliveries(t.Context(), id); err != nil || n != 1 || acked {
			t.Fatalf("a refused message: %d deliveries, acked %v (%v); want 1, not acked", n, acked, err)
		}
	}
	if pt, _ := bufferRows(t, r); pt != 2 {
		t.Fatalf("%d buffered plaintexts, want the refused messages'", pt)
	}

	r.relay.SetMode(testrelay.Store)
	r.reconnect()
	r.msgIn(ids[0], later[0])
	for _, id := range []string{ids[0], later[0]} {
		testwait.For(t, 5*time.Second, "the redelivery acknowledged", func() bool {
			n, acked, err := r.srv.Deliveries(t.Context(), id)
			return err == nil && n == 2 && acked
		})
	}
	if pt, hashes := bufferRows(t, r); pt != 0 || hashes != 2 {
		t.Fatalf("event buffer: %d plaintexts, %d hashes; want 0 and 2", pt, hashes)
	}
	if n := len(r.relay.Messages()); n != 2 {
		t.Fatalf("relay stored %d messages, want 2", n)
	}
}

func TestQueuedMessagesSurviveARestart(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	jid := r.linked()
	r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting) // hung: nothing can be delivered
	ids := r.inject(sandbox.Inject{From: "15551230003", Content: sandbox.Content{Text: "while away"}, Count: 3})
	r.stop()

	r2 := newRig(t, dir)
	r2.rec.next(t, bus.ConnConnecting)
	if e := r2.rec.next(t, bus.ConnConnected); e.JID != jid {
		t.Fatalf("after the restart connected as %q, want %q", e.JID, jid)
	}
	// The new process's fake clock starts at t0 again, before the
	// messages' time: let it catch up.
	r2.advanceUntil(time.Second, "the queued messages", func() bool { return len(r2.rec.msgIns()) >= 3 })
	r2.msgIn(ids...)
	testwait.For(t, 5*time.Second, "all acked", func() bool {
		st, err := r2.srv.Stats(t.Context())
		return err == nil && st.Unacked == 0 && st.Acked == 3
	})
}

func TestRestoredStoreIsAdoptedByAFreshServer(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	jid := r.linked()
	r.stop()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err := os.Remove(filepath.Join(dir, "sandbox.db"+suffix)); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	r2 := newRig(t, dir)
	r2.rec.next(t, bus.ConnConnecting)
	if e := r2.rec.next(t, bus.ConnConnected); e.JID != jid {
		t.Fatalf("connected as %q, want the restored %q", e.JID, jid)
	}
	ids := r2.inject(sandbox.Inject{From: "15551230004", Content: sandbox.Content{Text: "hi"}})
	r2.msgIn(ids...)
}

func TestLogoutWhileAwayIsToldOnConnect(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	r.linked()
	r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.fault(sandbox.Fault{Kind: sandbox.FaultLoggedOut}) // the phone unlinks us while we hang
	r.fault(sandbox.Fault{Kind: sandbox.FaultRelease})
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(2500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	if e := r.rec.next(t, bus.ConnLoggedOut); !strings.Contains(e.Reason, "logged out") {
		t.Errorf("logged_out reason %q", e.Reason)
	}
	r.rec.next(t, bus.ConnReconnecting)
	if n := count(t, storeDB(t, filepath.Join(dir, "session.db")), `SELECT count(*) FROM whatsmeow_device`); n != 0 {
		t.Errorf("device rows after a logout found on connect: %d, want 0 (whatsmeow deletes the device)", n)
	}
}

// TestRelinkedDeviceSurvivesARestart: after a logout found on connect and a
// new link, the store holds only the new device, and a restart connects as
// it rather than meeting the dead one again.
func TestRelinkedDeviceSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	old := r.linked()
	r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.fault(sandbox.Fault{Kind: sandbox.FaultLoggedOut})
	r.fault(sandbox.Fault{Kind: sandbox.FaultRelease})
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(2500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnLoggedOut)
	e := r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(time.Duration(e.DelayMS) * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnQR)
	relinked := r.linked2()
	if relinked == old {
		t.Fatalf("relinked as the logged-out %s", old)
	}
	if n := count(t, storeDB(t, filepath.Join(dir, "session.db")), `SELECT count(*) FROM whatsmeow_device`); n != 1 {
		t.Errorf("device rows after relinking: %d, want 1", n)
	}
	r.stop()

	r2 := newRig(t, dir)
	r2.rec.next(t, bus.ConnConnecting)
	if e := r2.rec.next(t, bus.ConnConnected); e.JID != relinked {
		t.Fatalf("after the restart: %s %q, want connected as %q", e.Kind, e.JID, relinked)
	}
}

func TestStoreGrowsAndChurnsLikeARealOne(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	r.linked()
	db := storeDB(t, filepath.Join(dir, "session.db"))
	blob := func(user string) []byte {
		var b []byte
		if err := db.QueryRow(`SELECT session FROM whatsmeow_sessions WHERE their_id = ?`, user+":0").Scan(&b); err != nil {
			t.Fatalf("session of %s: %v", user, err)
		}
		return b
	}
	preKeys := func() int { return count(t, db, `SELECT count(*) FROM whatsmeow_pre_keys`) }
	if n := preKeys(); n != 812 {
		t.Fatalf("pre-keys after linking: %d, want whatsmeow's first upload of 812", n)
	}
	var ids []string
	for _, from := range []string{"15550000001", "15550000002", "15550000003"} {
		ids = append(ids, r.inject(sandbox.Inject{From: from, Content: sandbox.Content{Text: "first"}})...)
	}
	r.msgIn(ids...)
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_sessions`); n != 3 {
		t.Errorf("session rows after 3 new contacts: %d", n)
	}
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_identity_keys`); n != 3 {
		t.Errorf("identity rows after 3 new contacts: %d", n)
	}
	if n := preKeys(); n != 809 {
		t.Errorf("pre-keys after 3 new contacts: %d, want 809 (one used up each)", n)
	}
	before := blob("15550000001")
	ids = r.inject(sandbox.Inject{From: "15550000001", Content: sandbox.Content{Text: "second"}})
	r.msgIn(ids...)
	if after := blob("15550000001"); bytes.Equal(before, after) {
		t.Error("the session row did not move with the message (no ratchet)")
	}
	if n := preKeys(); n != 809 {
		t.Errorf("pre-keys after a known contact's message: %d, want 809", n)
	}
	// 807 more new contacts leave the server 2 pre-keys: below whatsmeow's
	// minimum of 5, so the device uploads another 50 on the way.
	ids = nil
	for i := range 807 {
		ids = append(ids, r.inject(sandbox.Inject{From: "1555100" + pad4(i), Content: sandbox.Content{Text: "hi"}})...)
	}
	// 807 first messages, each moving the store: allow for -race.
	testwait.For(t, 2*time.Minute, "807 messages on msg.in", func() bool {
		seen := map[string]bool{}
		for _, m := range r.rec.msgIns() {
			seen[m.ID] = true
		}
		for _, id := range ids {
			if !seen[id] {
				return false
			}
		}
		return true
	})
	if n, max := preKeys(), count(t, db, `SELECT max(key_id) FROM whatsmeow_pre_keys`); n <= 5 || max <= 812 || max > 812+50 {
		t.Errorf("pre-keys after 810 new contacts: %d (max id %d), want one refill of 50 past id 812", n, max)
	}
	// Group messages rewrite the sender key.
	ids = r.inject(sandbox.Inject{From: "15550000002", Group: "1203630", Content: sandbox.Content{Text: "in a group"}})
	r.msgIn(ids...)
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_sender_keys`); n != 1 {
		t.Errorf("sender keys after a group message: %d", n)
	}
	// The 50th message moves app state.
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_app_state_mutation_macs`); n == 0 {
		t.Error("no app state mutations after 50 messages")
	}
	if n := count(t, db, `SELECT version FROM whatsmeow_app_state_version WHERE name = 'regular_high'`); n < 2 {
		t.Errorf("regular_high at version %d after 50 messages, want it moved", n)
	}
}

func pad4(i int) string { return fmt.Sprintf("%04d", i) }

func TestSendsAreRecordedAndRefusedOnDemand(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	var mu sync.Mutex
	var seen []sandbox.Sent
	r.srv.OnSent(func(s sandbox.Sent) {
		mu.Lock()
		seen = append(seen, s)
		mu.Unlock()
	})
	r.linked()
	send := func(text string) bus.MsgSendReply {
		t.Helper()
		body, _ := json.Marshal(bus.MsgSend{To: "15550001111", Text: text})
		msg, err := r.nc.Request(r.subj.MsgSend(), body, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var rep bus.MsgSendReply
		if err := json.Unmarshal(msg.Data, &rep); err != nil {
			t.Fatal(err)
		}
		return rep
	}
	rep := send("hello there")
	if !rep.OK || !strings.HasPrefix(rep.ID, "3EB0") || len(rep.ID) != 22 || rep.Timestamp == nil || !rep.Timestamp.Equal(t0) {
		t.Fatalf("send reply %+v", rep)
	}
	r.fault(sandbox.Fault{Kind: sandbox.FaultSendRateLimited})
	if rep := send("too fast"); rep.OK || !strings.Contains(rep.Error, "429") {
		t.Errorf("rate limited send: %+v", rep)
	}
	r.fault(sandbox.Fault{Kind: sandbox.FaultSendNotOnWhatsApp, Count: 2})
	for range 2 {
		if rep := send("anyone?"); rep.OK || !strings.Contains(rep.Error, "not on WhatsApp") {
			t.Errorf("send to a non-user: %+v", rep)
		}
	}
	if rep := send("back to normal"); !rep.OK {
		t.Errorf("send after the refusals: %+v", rep)
	}
	out, err := r.srv.Outbox(t.Context(), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 5 || out[0].Text != "hello there" || out[0].ID != rep.ID && out[0].Refused != "" || out[1].Refused == "" || out[4].Refused != "" {
		t.Errorf("outbox %+v", out)
	}
	mu.Lock()
	if len(seen) != 5 || seen[0].To != "15550001111@s.whatsapp.net" {
		t.Errorf("OnSent saw %+v", seen)
	}
	mu.Unlock()
	db := storeDB(t, filepath.Join(dir, "session.db"))
	if n := count(t, db, `SELECT count(*) FROM whatsmeow_sessions WHERE their_id = '15550001111:0'`); n != 1 {
		t.Errorf("no session with the recipient after sending")
	}
}

func TestSeedRepeatsIDsAndCodes(t *testing.T) {
	run := func() (string, []string) {
		r := newRig(t, t.TempDir())
		r.rec.next(t, bus.ConnConnecting)
		qr := r.rec.next(t, bus.ConnQR)
		r.linked2()
		return qr.Code, r.inject(sandbox.Inject{From: "15550000009", Content: sandbox.Content{Text: "x"}, Count: 3})
	}
	qr1, ids1 := run()
	qr2, ids2 := run()
	if qr1 != qr2 || strings.Join(ids1, ",") != strings.Join(ids2, ",") {
		t.Errorf("same seed, different runs: %q %v vs %q %v", qr1, ids1, qr2, ids2)
	}
}

func TestRateSpreadsAFloodOverTime(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	ids := r.inject(sandbox.Inject{From: "15550000077", Content: sandbox.Content{Text: "tick"}, Count: 4, Rate: 1})
	r.msgIn(ids[0])
	if n := len(r.rec.msgIns()); n != 1 {
		t.Fatalf("%d messages before a second passed, want 1", n)
	}
	for i := 1; i < 4; i++ {
		r.advanceUntil(100*time.Millisecond, "message "+ids[i], func() bool { return len(r.rec.msgIns()) > i })
		if n := len(r.rec.msgIns()); n != i+1 {
			t.Fatalf("after %d s: %d messages, want %d", i, n, i+1)
		}
		if got := r.clock.Since(t0); got < time.Duration(i)*time.Second {
			t.Fatalf("message %d came %s after the inject, want %ds", i+1, got, i)
		}
	}
	m := r.msgIn(ids...)
	if !m[ids[3]].Timestamp.Equal(t0.Add(3 * time.Second)) {
		t.Errorf("the 4th message's timestamp %s, want the inject's time plus 3 s", m[ids[3]].Timestamp)
	}
}

func TestPairingCodeLinksThePairPhoneNumber(t *testing.T) {
	r := newRig(t, t.TempDir(), func(r *rig) { r.cfg.PairPhone = "15557654321" })
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnQR)
	code := r.rec.next(t, bus.ConnPairCode)
	if len(code.Code) != 9 || code.Code[4] != '-' {
		t.Errorf("pairing code %q, want XXXX-XXXX", code.Code)
	}
	jid, err := r.srv.Link(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	if jid.User != "15557654321" {
		t.Errorf("linked %s, want PAIR_PHONE's number", jid)
	}
	r.rec.next(t, bus.ConnPaired)
	r.rec.next(t, bus.ConnConnected)
}

func TestLinkWorksUntilTheLastQRCodeExpires(t *testing.T) {
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(t0)
	srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{Path: filepath.Join(dir, "sandbox.db"), Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if _, err := srv.Link(t.Context(), ""); !sandbox.IsBadRequest(err) {
		t.Errorf("link with no client: %v, want a refusal", err)
	}
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(dir, "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	qr := make(chan struct{}, 1)
	c.OnEvent(func(evt any) {
		if _, ok := evt.(*events.QR); ok {
			qr <- struct{}{}
		}
	})
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	<-qr
	clock.Advance(60*time.Second + 5*20*time.Second - time.Second)
	if _, err := srv.Link(t.Context(), "15550001234"); err != nil {
		t.Fatalf("link while the last code is live: %v", err)
	}
	if _, err := srv.Link(t.Context(), ""); err == nil || !strings.Contains(err.Error(), "already linked") {
		t.Errorf("second link: %v", err)
	}
}

func TestLinkIsRefusedAfterTheLastQRCode(t *testing.T) {
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(t0)
	srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{Path: filepath.Join(dir, "sandbox.db"), Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(dir, "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	qr := make(chan struct{}, 1)
	c.OnEvent(func(evt any) {
		if _, ok := evt.(*events.QR); ok {
			qr <- struct{}{}
		}
	})
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	<-qr
	clock.Advance(60*time.Second + 5*20*time.Second)
	if _, err := srv.Link(t.Context(), ""); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("link after the last code expired: %v", err)
	}
}

// TestStoreFilesAreOwnerOnlyAtTheirExactPath: session.db and sandbox.db
// (and their WAL files) are readable by their owner only, whatever the
// umask, and a path with %, ? or # names itself.
func TestStoreFilesAreOwnerOnlyAtTheirExactPath(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a%41b?c#d")
	r := newRig(t, dir)
	r.linked()
	ids := r.inject(sandbox.Inject{From: "15551230009", Content: sandbox.Content{Text: "hi"}})
	r.msgIn(ids...)
	for _, name := range []string{"session.db", "session.db-wal", "sandbox.db", "sandbox.db-wal"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "aAb")); err == nil {
		t.Error("a file landed under the percent-decoded path")
	}
}

// TestSeedRepeatsIDsUnderInterleavedTraffic: with the same seed, message
// ids repeat although the delivery goroutine (session rows, app state) and
// a bot answering each message (outgoing ids) draw while the next injects
// draw their ids.
func TestSeedRepeatsIDsUnderInterleavedTraffic(t *testing.T) {
	run := func() (in, out []string) {
		r := newRig(t, t.TempDir())
		r.linked()
		// The bot: answers every message as it arrives.
		sub, err := r.nc.Subscribe(r.subj.MsgIn(), func(m *nats.Msg) {
			var in bus.MsgIn
			if json.Unmarshal(m.Data, &in) != nil {
				return
			}
			body, _ := json.Marshal(bus.MsgSend{To: in.Chat, Text: "re " + in.Text})
			_ = r.nc.PublishRequest(r.subj.MsgSend(), nats.NewInbox(), body)
		})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = sub.Unsubscribe() }()
		for i := range 20 {
			in = append(in, r.inject(sandbox.Inject{From: fmt.Sprintf("155500010%02d", i), Content: sandbox.Content{Text: fmt.Sprint(i)}})...)
		}
		r.msgIn(in...)
		var sent []sandbox.Sent
		testwait.For(t, 10*time.Second, "20 answers", func() bool {
			sent, err = r.srv.Outbox(t.Context(), 100)
			return err == nil && len(sent) == 20
		})
		// The bot's answers race each other to the gateway: the same
		// ids, not necessarily to the same recipients.
		for _, m := range sent {
			out = append(out, m.ID)
		}
		slices.Sort(out)
		r.stop()
		return in, out
	}
	in1, out1 := run()
	in2, out2 := run()
	if !slices.Equal(in1, in2) {
		t.Errorf("same seed, different incoming ids:\n%v\n%v", in1, in2)
	}
	if !slices.Equal(out1, out2) {
		t.Errorf("same seed, different outgoing ids:\n%v\n%v", out1, out2)
	}
}

// TestQueuedMessagesGoOnlyToTheDeviceTheyWereSentTo: messages queued for a
// device that is then logged out are dropped, not handed to the device
// linked next; that device receives what is sent to it.
func TestQueuedMessagesGoOnlyToTheDeviceTheyWereSentTo(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	old := r.inject(sandbox.Inject{From: "15551230010", Content: sandbox.Content{Text: "for the old device"}, Count: 2})
	r.fault(sandbox.Fault{Kind: sandbox.FaultLoggedOut})
	r.fault(sandbox.Fault{Kind: sandbox.FaultRelease})
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(2500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnLoggedOut)
	e := r.rec.next(t, bus.ConnReconnecting)
	if _, err := r.srv.Inject(t.Context(), sandbox.Inject{From: "15551230011", Content: sandbox.Content{Text: "x"}}); err == nil {
		t.Error("inject with no device linked was accepted")
	}
	r.clock.Advance(time.Duration(e.DelayMS) * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnQR)
	r.linked2()
	fresh := r.inject(sandbox.Inject{From: "15551230012", Content: sandbox.Content{Text: "for the new device"}})
	r.msgIn(fresh...)
	for _, m := range r.rec.msgIns() {
		if slices.Contains(old, m.ID) {
			t.Errorf("the new device received %s, queued for the logged-out one", m.ID)
		}
	}
	st, err := r.srv.Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.Unacked+st.Acked != 1 {
		t.Errorf("inbox %+v: want only the new device's message (the old device's dropped)", st)
	}
}

// TestLogsMaskTheDevicesJID: linking and adopting a restored store log the
// device's JID masked, never the phone number in full.
func TestLogsMaskTheDevicesJID(t *testing.T) {
	dir := t.TempDir()
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	open := func() (*sandbox.Server, *sandbox.Client) {
		srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{Path: filepath.Join(dir, "sandbox.db"), Seed: "test-seed", Log: log})
		if err != nil {
			t.Fatal(err)
		}
		c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(dir, "session.db"), Log: log})
		if err != nil {
			t.Fatal(err)
		}
		connected := make(chan struct{}, 1)
		c.OnEvent(func(evt any) {
			if _, ok := evt.(*events.Connected); ok {
				select {
				case connected <- struct{}{}:
				default:
				}
			}
		})
		if err := c.Connect(t.Context()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(); _ = srv.Close() })
		return srv, c
	}
	srv, c := open()
	var jid string
	testwait.For(t, 5*time.Second, "the link", func() bool {
		j, err := srv.Link(t.Context(), "4915112345678")
		jid = j.User
		return err == nil
	})
	_ = c.Close()
	_ = srv.Close()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		_ = os.Remove(filepath.Join(dir, "sandbox.db"+suffix))
	}
	_, c2 := open() // a fresh server file adopts the restored store
	testwait.For(t, 5*time.Second, "the adopted device connected", c2.IsConnected)
	out := buf.String()
	if !strings.Contains(out, "device linked") || !strings.Contains(out, "adopting") {
		t.Fatalf("log lacks the link or adoption lines:\n%s", out)
	}
	if strings.Contains(out, jid) {
		t.Errorf("the log shows the phone number %s in full:\n%s", jid, out)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// holder holds the first delivery of a message with text hold in the
// handler until released, so a test can close the socket under it.
type holder struct {
	*sandbox.Client
	once    sync.Once
	held    chan struct{}
	release chan struct{}
}

func (h *holder) OnEventWithSuccess(f func(any) bool) {
	h.Client.OnEventWithSuccess(func(evt any) bool {
		ok := f(evt)
		if m, isMsg := evt.(*events.Message); isMsg && m.Message.GetConversation() == "hold" {
			h.once.Do(func() {
				close(h.held)
				<-h.release
			})
		}
		return ok
	})
}

// TestHandledMessageWhoseAckWasLostIsNotDispatchedAgain: a message the
// handlers finished with but whose ack was lost with the socket is, when
// WhatsApp sends it again, only acknowledged, as whatsmeow's decrypted
// event buffer makes it (EventAlreadyProcessed).
func TestHandledMessageWhoseAckWasLostIsNotDispatchedAgain(t *testing.T) {
	h := &holder{held: make(chan struct{}), release: make(chan struct{})}
	r := newRig(t, t.TempDir(), func(r *rig) {
		r.wrap = func(c *sandbox.Client) gateway.Conn { h.Client = c; return h }
	})
	r.linked()
	ids := r.inject(sandbox.Inject{From: "15551230020", Content: sandbox.Content{Text: "hold"}})
	<-h.held
	faulted := make(chan error, 1)
	go func() { faulted <- r.srv.Fault(context.Background(), sandbox.Fault{Kind: sandbox.FaultDisconnect}) }()
	testwait.For(t, 5*time.Second, "the socket closed under the handler", func() bool { return !h.IsConnected() })
	close(h.release)
	if err := <-faulted; err != nil {
		t.Fatal(err)
	}
	if n, acked, err := r.srv.Deliveries(t.Context(), ids[0]); err != nil || n != 1 || acked {
		t.Fatalf("after the lost ack: %d deliveries, acked %v (%v); want 1, not acked", n, acked, err)
	}
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnConnected)
	testwait.For(t, 5*time.Second, "the redelivery acknowledged", func() bool {
		n, acked, err := r.srv.Deliveries(t.Context(), ids[0])
		return err == nil && n == 2 && acked
	})
	n := 0
	for _, m := range r.rec.msgIns() {
		if m.ID == ids[0] {
			n++
		}
	}
	if n != 1 {
		t.Errorf("the message reached msg.in %d times, want once", n)
	}
}
