package gateway

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"go.uber.org/goleak"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestConnectsAndHeartbeats(t *testing.T) {
	h := start(t)
	<-h.opens
	h.connected()
	ev := h.rec.connEvents()[1]
	if ev.JID != "15559998888@s.whatsapp.net" || ev.Session != "Test-Bot" || !ev.At.Equal(t0) {
		t.Fatalf("connected event = %+v", ev)
	}
	h.advance(bus.HeartbeatInterval)
	testwait.For(t, 5*time.Second, "a connected heartbeat", func() bool {
		hb, d, ok := h.rec.lastBeat(h.subj)
		return ok && hb.State == bus.StateConnected && d.JID == ev.JID && d.ConnectedSince != nil &&
			d.ConnectedSince.Equal(t0) && hb.Service == "gateway" && hb.Instance == "test-1"
	})
}

func TestReconnectBackoffGrows(t *testing.T) {
	h := start(t, func(_ *Config, c *fakeConn) { c.connectErr = errDial })
	// Jitter 0.5, min 1s, max 10s: delays 1.5s, 2.5s, 4.5s, 5.5s, 5.5s.
	want := []time.Duration{1500, 2500, 4500, 5500, 5500}
	if ev := h.rec.next(t, bus.ConnConnecting); ev.Attempt != 0 {
		t.Fatalf("first connecting attempt = %d", ev.Attempt)
	}
	for i, ms := range want {
		ev := h.rec.next(t, bus.ConnReconnecting)
		if ev.Attempt != i+1 || ev.DelayMS != int64(ms) {
			t.Fatalf("reconnect %d: attempt %d delay %dms, want %d and %dms", i+1, ev.Attempt, ev.DelayMS, i+1, ms)
		}
		h.advance(time.Duration(ms)*time.Millisecond - time.Millisecond)
		h.probe()
		h.rec.none(t) // not a millisecond early
		h.advance(time.Millisecond)
		if ev := h.rec.next(t, bus.ConnConnecting); ev.Attempt != i+1 {
			t.Fatalf("connecting attempt = %d, want %d", ev.Attempt, i+1)
		}
	}
	if n := h.conn.get(func(f *fakeConn) int { return f.connects }); n != len(want)+1 {
		t.Fatalf("connects = %d, want %d", n, len(want)+1)
	}
}

func TestAttemptResetsAfterStableConnection(t *testing.T) {
	tests := []struct {
		name        string
		upFor       time.Duration
		wantAttempt int
	}{
		{"short connection keeps counting", 59 * time.Second, 2},
		{"stable connection resets", 60 * time.Second, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			h.conn.emit(&events.Disconnected{})
			h.rec.next(t, bus.ConnDisconnected)
			ev := h.rec.next(t, bus.ConnReconnecting)
			if ev.Attempt != 1 {
				t.Fatalf("first reconnect attempt = %d", ev.Attempt)
			}
			h.advance(time.Duration(ev.DelayMS) * time.Millisecond)
			h.rec.next(t, bus.ConnConnecting)
			h.conn.emit(&events.Connected{})
			h.rec.next(t, bus.ConnConnected)
			h.advance(tt.upFor)
			h.conn.emit(&events.Disconnected{})
			h.rec.next(t, bus.ConnDisconnected)
			if ev := h.rec.next(t, bus.ConnReconnecting); ev.Attempt != tt.wantAttempt {
				t.Fatalf("attempt after %s up = %d, want %d", tt.upFor, ev.Attempt, tt.wantAttempt)
			}
		})
	}
}

// A burst of failure events while a connect is in flight or a retry is
// pending must not start a second connect loop.
func TestNoDuplicateConnectLoops(t *testing.T) {
	gate := make(chan struct{})
	h := start(t, func(_ *Config, c *fakeConn) { c.gate = gate })
	h.rec.next(t, bus.ConnConnecting)
	testwait.For(t, 5*time.Second, "Connect to be called", func() bool {
		return h.conn.get(func(f *fakeConn) int { return f.inConnect }) == 1
	})
	// While Connect blocks: failures pile up and time passes.
	for range 10 {
		h.conn.emit(&events.Disconnected{})
		h.conn.emit(&events.ConnectFailure{Reason: events.ConnectFailureServiceUnavailable})
	}
	h.advance(time.Hour)
	close(gate) // Connect returns ok; the queued failures follow.
	h.conn.mu.Lock()
	h.conn.gate = nil
	h.conn.mu.Unlock()
	h.rec.next(t, bus.ConnDisconnected)
	ev := h.rec.next(t, bus.ConnReconnecting)
	if ev.Attempt != 1 {
		t.Fatalf("attempt = %d, want 1", ev.Attempt)
	}
	h.probe()
	// Every later failure was absorbed by the one pending retry.
	for _, e := range h.rec.connEvents()[3:] {
		if e.Kind == bus.ConnReconnecting || e.Kind == bus.ConnConnecting {
			t.Fatalf("a second retry was scheduled: %v", kinds(h.rec.connEvents()))
		}
	}
	h.advance(time.Duration(ev.DelayMS) * time.Millisecond)
	h.rec.cursor = len(h.rec.connEvents())
	testwait.For(t, 5*time.Second, "second connect", func() bool {
		return h.conn.get(func(f *fakeConn) int { return f.connects }) == 2
	})
	if m := h.conn.get(func(f *fakeConn) int { return f.maxInConnect }); m != 1 {
		t.Fatalf("concurrent Connect calls = %d, want 1", m)
	}
	if err := h.gw.Run(context.Background()); !errors.Is(err, ErrRunning) {
		t.Fatalf("second Run = %v, want ErrRunning", err)
	}
}

func TestTerminalEvents(t *testing.T) {
	ban := t0.Add(2 * time.Hour)
	tests := []struct {
		name    string
		evt     any
		kind    string
		check   func(t *testing.T, ev bus.ConnEvent)
		state   string
		retryIn time.Duration // 0: no retry at all
		resets  int
	}{
		{
			name: "logged out clears the device and pairs again",
			evt:  &events.LoggedOut{OnConnect: true, Reason: events.ConnectFailureLoggedOut},
			kind: bus.ConnLoggedOut,
			check: func(t *testing.T, ev bus.ConnEvent) {
				if ev.Reason == "" {
					t.Fatal("logged_out without a reason")
				}
			},
			state: bus.StateLoggedOut, retryIn: 1500 * time.Millisecond, resets: 1,
		},
		{
			name: "stream replaced waits long", evt: &events.StreamReplaced{}, kind: bus.ConnStreamReplaced,
			state: bus.StateStreamReplaced, retryIn: DefaultStreamReplacedWait,
		},
		{
			name: "temporary ban waits for expiry", evt: &events.TemporaryBan{Code: events.TempBanBlockedByUsers, Expire: 2 * time.Hour},
			kind: bus.ConnTemporaryBan,
			check: func(t *testing.T, ev bus.ConnEvent) {
				if ev.Code != "102" || ev.ExpiresAt == nil || !ev.ExpiresAt.Equal(ban) {
					t.Fatalf("temporary_ban = %+v, want code 102 expiring %s", ev, ban)
				}
			},
			state: bus.StateBanned, retryIn: 2 * time.Hour,
		},
		{
			name: "temporary ban without expiry waits the fallback", evt: &events.TemporaryBan{Code: events.TempBanSentToTooManyPeople},
			kind: bus.ConnTemporaryBan,
			check: func(t *testing.T, ev bus.ConnEvent) {
				if ev.Code != "101" || ev.ExpiresAt != nil {
					t.Fatalf("temporary_ban = %+v", ev)
				}
			},
			state: bus.StateBanned, retryIn: DefaultBanFallbackWait,
		},
		{
			name: "client outdated stops retrying", evt: &events.ClientOutdated{}, kind: bus.ConnClientOutdated,
			state: bus.StateOutdated,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			h.conn.emit(tt.evt)
			ev := h.rec.next(t, tt.kind)
			if tt.check != nil {
				tt.check(t, ev)
			}
			if tt.retryIn == 0 {
				// Nothing brings it back: not time, not more failures.
				h.advance(48 * time.Hour)
				h.conn.emit(&events.Disconnected{})
				h.rec.next(t, bus.ConnDisconnected)
				h.probe()
				h.rec.none(t)
				if n := h.conn.get(func(f *fakeConn) int { return f.connects }); n != 1 {
					t.Fatalf("connects = %d, want 1", n)
				}
			} else {
				r := h.rec.next(t, bus.ConnReconnecting)
				if r.DelayMS != tt.retryIn.Milliseconds() {
					t.Fatalf("retry in %dms, want %s", r.DelayMS, tt.retryIn)
				}
				// Failures during the wait do not shorten it.
				h.conn.emit(&events.Disconnected{})
				h.rec.next(t, bus.ConnDisconnected)
				h.advance(tt.retryIn - time.Millisecond)
				h.probe()
				h.rec.none(t)
			}
			if got := h.gw.State(); got != tt.state {
				t.Fatalf("state = %q, want %q", got, tt.state)
			}
			// What the next heartbeat will carry.
			if st, d := h.gw.beat(); st != tt.state || d.(bus.GatewayDetails).WAState != tt.state || d.(bus.GatewayDetails).LastDisconnect == "" {
				t.Fatalf("heartbeat = %s %+v, want state %s and a last disconnect", st, d, tt.state)
			}
			if d := h.conn.get(func(f *fakeConn) int { return f.disconnects }); d < 1 {
				t.Fatal("the socket was not closed")
			}
			if r := h.conn.get(func(f *fakeConn) int { return f.resets }); r != tt.resets {
				t.Fatalf("device resets = %d, want %d", r, tt.resets)
			}
			if _, d := h.gw.beat(); (d.(bus.GatewayDetails).JID == "") != (tt.resets > 0) {
				t.Fatalf("heartbeat JID = %q after %d device resets", d.(bus.GatewayDetails).JID, tt.resets)
			}
			if tt.retryIn > 0 {
				h.advance(time.Millisecond)
				h.rec.next(t, bus.ConnConnecting)
			}
		})
	}
}

func TestKeepalive(t *testing.T) {
	tests := []struct {
		name      string
		silentFor time.Duration
		reconnect bool
	}{
		{"short silence: publish only", time.Minute, false},
		{"over three minutes: reconnect", 3*time.Minute + time.Second, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			h.advance(tt.silentFor)
			h.conn.emit(&events.KeepAliveTimeout{ErrorCount: 2, LastSuccess: t0})
			if ev := h.rec.next(t, bus.ConnKeepaliveTimeout); ev.Attempt != 2 || ev.Reason == "" {
				t.Fatalf("keepalive_timeout = %+v", ev)
			}
			if tt.reconnect {
				h.rec.next(t, bus.ConnReconnecting)
				if h.gw.State() != bus.StateReconnecting {
					t.Fatalf("state = %s", h.gw.State())
				}
				return
			}
			h.conn.emit(&events.KeepAliveRestored{})
			h.rec.next(t, bus.ConnKeepaliveRestored)
			h.probe()
			h.rec.none(t)
			if h.gw.State() != bus.StateConnected {
				t.Fatalf("state = %s", h.gw.State())
			}
		})
	}
}

func TestConnectFailureIsTransient(t *testing.T) {
	h := start(t)
	h.rec.next(t, bus.ConnConnecting)
	// whatsmeow emits ConnectFailure only for reasons it has no other
	// event for (a 5xx just closes the socket).
	h.conn.emit(&events.ConnectFailure{Reason: events.ConnectFailureBadUserAgent, Message: "try later"})
	ev := h.rec.next(t, bus.ConnConnectFailure)
	if want := "409: client user agent was rejected (try later)"; ev.Reason != want {
		t.Fatalf("connect_failure reason = %q, want %q", ev.Reason, want)
	}
	r := h.rec.next(t, bus.ConnReconnecting)
	h.advance(time.Duration(r.DelayMS) * time.Millisecond)
	h.rec.next(t, bus.ConnConnecting)
}

func TestLoginWatchdog(t *testing.T) {
	h := start(t)
	h.rec.next(t, bus.ConnConnecting)
	// The socket opened but neither Connected nor QR follows.
	h.advance(DefaultLoginTimeout - time.Millisecond)
	h.probe()
	h.rec.none(t)
	h.advance(time.Millisecond)
	h.rec.next(t, bus.ConnReconnecting)
}

func TestQRPairingFlow(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	// Backup answers the restore; the store is opened only then.
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceNone})
	})
	// The first restore request may have gone out before the responder
	// subscribed: step the fake clock until the store opens.
	h.advanceUntilOpen(t)

	h.rec.next(t, bus.ConnConnecting)
	h.conn.emit(&events.QR{Codes: []string{"code-a", "code-b", "code-c"}})
	qr := h.rec.next(t, bus.ConnQR)
	if qr.Code != "code-a" || !qr.ExpiresAt.Equal(qr.At.Add(60*time.Second)) {
		t.Fatalf("first qr = %+v", qr)
	}
	h.advance(time.Nanosecond) // a fresh heartbeat carries the code
	h.advance(bus.HeartbeatInterval)
	testwait.For(t, 5*time.Second, "pairing heartbeat with the QR code", func() bool {
		hb, d, ok := h.rec.lastBeat(h.subj)
		return ok && hb.State == bus.StatePairing && d.QRCode == "code-a" && d.QRExpiresAt != nil
	})
	h.advance(60*time.Second - bus.HeartbeatInterval - time.Nanosecond)
	if qr := h.rec.next(t, bus.ConnQR); qr.Code != "code-b" {
		t.Fatalf("second qr = %+v", qr)
	}
	h.advance(20 * time.Second)
	if qr := h.rec.next(t, bus.ConnQR); qr.Code != "code-c" {
		t.Fatalf("third qr = %+v", qr)
	}
	// Codes ran out unscanned: a fresh round after the minimum backoff.
	h.advance(20 * time.Second)
	r := h.rec.next(t, bus.ConnReconnecting)
	if r.Attempt != 1 {
		t.Fatalf("attempt after QR round = %d, want 1", r.Attempt)
	}
	h.advance(time.Duration(r.DelayMS) * time.Millisecond)
	h.rec.next(t, bus.ConnConnecting)
	h.conn.emit(&events.QR{Codes: []string{"code-d"}})
	h.rec.next(t, bus.ConnQR)

	jid := types.NewJID("15559998888", types.DefaultUserServer)
	h.conn.mu.Lock()
	h.conn.jid = jid
	h.conn.mu.Unlock()
	h.conn.emit(&events.PairSuccess{ID: jid, Platform: "android"})
	if p := h.rec.next(t, bus.ConnPaired); p.JID != jid.String() {
		t.Fatalf("paired = %+v", p)
	}
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)
	h.qrMu.Lock()
	shown := strings.Join(h.shown, ",")
	h.qrMu.Unlock()
	if shown != "code-a,code-b,code-c,code-d" {
		t.Fatalf("terminal showed %q", shown)
	}
}

// advanceUntilOpen steps the fake clock until the gateway opens the store:
// restore retries wait on that clock.
func (h *harness) advanceUntilOpen(t *testing.T) {
	t.Helper()
	testwait.For(t, 10*time.Second, "the store to open", func() bool {
		select {
		case <-h.opens:
			return true
		default:
			h.advance(500 * time.Millisecond)
			return false
		}
	})
}

func TestPairPhone(t *testing.T) {
	h := start(t, func(c *Config, f *fakeConn) {
		c.PairPhone = "15551234567"
		f.pairCode = "ABCD-EFGH"
	})
	h.rec.next(t, bus.ConnConnecting)
	h.conn.emit(&events.QR{Codes: []string{"code-a", "code-b"}})
	h.rec.next(t, bus.ConnQR)
	if pc := h.rec.next(t, bus.ConnPairCode); pc.Code != "ABCD-EFGH" {
		t.Fatalf("pair_code = %+v", pc)
	}
	// A second QR rotation does not ask for another code on the same socket.
	h.advance(60 * time.Second)
	h.rec.next(t, bus.ConnQR)
	h.probe()
	if p := h.conn.get(func(f *fakeConn) int { return len(f.pairPhones) }); p != 1 {
		t.Fatalf("PairPhone calls = %d", p)
	}
	h.advance(bus.HeartbeatInterval)
	testwait.For(t, 5*time.Second, "heartbeat with the pair code", func() bool {
		_, d, ok := h.rec.lastBeat(h.subj)
		return ok && d.PairCode == "ABCD-EFGH"
	})
	h.qrMu.Lock()
	defer h.qrMu.Unlock()
	if len(h.shown) != 0 {
		t.Fatalf("QR drawn in the terminal in pairing-code mode: %v", h.shown)
	}
}

func TestRestoreBeforeOpen(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	// Nobody answers yet: the gateway waits, the store stays closed.
	testwait.For(t, 5*time.Second, "waiting_restore heartbeat", func() bool {
		hb, _, ok := h.rec.lastBeat(h.subj)
		return ok && hb.State == bus.StateWaitingRestore
	})
	replies := make(chan bus.RestoreReply, 2)
	replies <- bus.RestoreReply{Instance: testUnit, OK: false, Error: "lease held by another instance"}
	replies <- bus.RestoreReply{Instance: testUnit, OK: true, Restored: true, Source: bus.SourceDatabase, SnapshotID: 9}
	asked := make(chan struct{}, 8)
	h.serveRestore(func(m *nats.Msg) {
		if string(m.Data) != "{}" {
			t.Errorf("restore request body = %q, want {}", m.Data)
		}
		asked <- struct{}{}
		_ = bus.Respond(m, <-replies)
	})
	// Backup reports another instance holding the lease: so does our heartbeat.
	standby := bus.ConnEvent{Instance: testUnit, Kind: bus.ConnStandby, Reason: "lease held"}
	standby.Stamp("Test-Bot", h.clock.Now())
	if err := bus.Publish(h.nc, h.subj.Conn(bus.ConnStandby), standby); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "standby state", func() bool { return h.gw.State() == bus.StateStandby })
	if st, _ := h.gw.beat(); st != bus.StateStandby {
		t.Fatalf("heartbeat state = %s", st)
	}
	h.advanceUntilOpen(t)
	if len(asked) != 2 {
		t.Fatalf("store opened after %d restore requests, want 2 (refused, then ok)", len(asked))
	}
	h.rec.next(t, bus.ConnStandby)
	h.rec.next(t, bus.ConnConnecting)
}

func TestStopClosesAndPublishesStopped(t *testing.T) {
	h := start(t)
	h.connected()
	h.shutdown()
	h.rec.next(t, bus.ConnStopped)
	if d, c := h.conn.get(func(f *fakeConn) int { return f.disconnects }), h.conn.get(func(f *fakeConn) int { return f.closes }); d < 1 || c != 1 {
		t.Fatalf("disconnects=%d closes=%d", d, c)
	}
	if h.gw.State() != bus.StateStopped {
		t.Fatalf("state = %s", h.gw.State())
	}
	testwait.For(t, 5*time.Second, "a final heartbeat saying stopped", func() bool {
		hb, _, ok := h.rec.lastBeat(h.subj)
		return ok && hb.State == bus.StateStopped
	})
}

// A socket that dies without an event is noticed by the liveness check; a
// login whose socket is already gone is not taken for a connection.
func TestSilentSocketDeath(t *testing.T) {
	h := start(t)
	h.connected()
	h.conn.mu.Lock()
	h.conn.connected = false
	h.conn.mu.Unlock()
	h.advance(DefaultLivenessInterval)
	r := h.rec.next(t, bus.ConnReconnecting)
	if _, d := h.gw.beat(); !strings.Contains(d.(bus.GatewayDetails).LastDisconnect, "without a disconnect event") {
		t.Fatalf("last disconnect = %q", d.(bus.GatewayDetails).LastDisconnect)
	}
	h.advance(time.Duration(r.DelayMS) * time.Millisecond)
	h.rec.next(t, bus.ConnConnecting)
	h.conn.mu.Lock()
	h.conn.connected = false
	h.conn.mu.Unlock()
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnReconnecting)
	if h.gw.State() != bus.StateReconnecting {
		t.Fatalf("state = %s", h.gw.State())
	}
}

func TestStopWhileWaitingForRestore(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	testwait.For(t, 5*time.Second, "waiting_restore", func() bool { return h.gw.State() == bus.StateWaitingRestore })
	h.shutdown()
	h.rec.next(t, bus.ConnStopped)
	if len(h.opens) != 0 {
		t.Fatal("store opened without a restore answer")
	}
}

func TestOpenFailureIsAnError(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := srv.Connect("gw", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	g := New(Config{Session: "x"}, Deps{NC: nc, Log: discard(), Open: func(context.Context) (Conn, error) {
		return nil, errors.New("disk full")
	}})
	if err := g.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Run = %v, want the open error", err)
	}
}

// The reconnects counter counts retries after a lost or failed connection,
// not pairing rounds, re-pairing after a logout or terminal waits.
func TestReconnectsCountsOnlyReconnects(t *testing.T) {
	tests := []struct {
		name string
		do   func(h *harness)
		want int64
	}{
		{"disconnect", func(h *harness) {
			h.connected()
			h.conn.emit(&events.Disconnected{})
		}, 1},
		{"connect failure", func(h *harness) {
			h.rec.next(h.t, bus.ConnConnecting)
			h.conn.emit(&events.ConnectFailure{Reason: events.ConnectFailureServiceUnavailable})
		}, 1},
		{"QR codes expired unscanned", func(h *harness) {
			h.rec.next(h.t, bus.ConnConnecting)
			h.conn.emit(&events.QR{Codes: []string{"code-a"}})
			h.rec.next(h.t, bus.ConnQR)
			h.advance(firstQRTTL)
		}, 0},
		{"logged out", func(h *harness) {
			h.connected()
			h.conn.emit(&events.LoggedOut{Reason: events.ConnectFailureLoggedOut})
		}, 0},
		{"stream replaced", func(h *harness) {
			h.connected()
			h.conn.emit(&events.StreamReplaced{})
		}, 0},
		{"temporary ban", func(h *harness) {
			h.connected()
			h.conn.emit(&events.TemporaryBan{Code: events.TempBanBlockedByUsers, Expire: time.Hour})
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			tt.do(h)
			testwait.For(t, 5*time.Second, "a retry to be scheduled", func() bool {
				for _, e := range h.rec.connEvents() {
					if e.Kind == bus.ConnReconnecting {
						return true
					}
				}
				return false
			})
			if _, d := h.gw.beat(); d.(bus.GatewayDetails).Reconnects != tt.want {
				t.Fatalf("reconnects = %d, want %d", d.(bus.GatewayDetails).Reconnects, tt.want)
			}
		})
	}
}
