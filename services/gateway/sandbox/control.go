package sandbox

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/logging"
	"go.mau.fi/whatsmeow/proto/waAdv"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
)

// Link links the device now, as if the QR code on screen had been scanned
// (or the pairing code entered): the device is saved with its JID through
// whatsmeow's store, PairSuccess follows, then, as after WhatsApp's
// post-pairing reconnect, Connected. phone names the account; empty takes
// the number a pairing code was asked for, else one made from the seed.
func (s *Server) Link(ctx context.Context, phone string) (types.JID, error) {
	c := s.current()
	if c == nil {
		return types.EmptyJID, bad("not pairing: the gateway has no session store open")
	}
	return c.link(ctx, phone)
}

func (c *Client) link(ctx context.Context, phone string) (types.JID, error) {
	now := c.srv.clock.Now()
	c.mu.Lock()
	sock, dev := c.sock, c.dev
	switch {
	case dev.ID != nil:
		c.mu.Unlock()
		return types.EmptyJID, bad("already linked as %s", dev.ID)
	case sock == nil || sock.qrAt.IsZero():
		c.mu.Unlock()
		return types.EmptyJID, bad("not pairing: no QR code is on offer right now (the gateway is not connected)")
	case now.Sub(sock.qrAt) >= qrValidFor:
		c.mu.Unlock()
		return types.EmptyJID, bad("not pairing: the QR codes expired; the gateway will offer new ones")
	}
	if phone == "" {
		phone = c.pairPhone
	}
	c.mu.Unlock()
	seed := c.srv.seed
	if phone == "" {
		phone = "1555" + seed.digits("account-number", 7)
	}
	device := uint16(2 + seed.rng("device-number").IntN(60))
	jid := types.JID{User: phone, Server: types.DefaultUserServer, Device: device}
	lid := types.JID{User: "1" + seed.digits("lid", 14), Server: types.HiddenUserServer, Device: device}
	c.mu.Lock()
	if c.sock != sock || dev.ID != nil {
		c.mu.Unlock()
		return types.EmptyJID, bad("not pairing any more")
	}
	dev.ID, dev.LID = &jid, lid
	dev.Platform, dev.PushName = "android", "Sandbox"
	dev.Account = &waAdv.ADVSignedDeviceIdentity{
		Details:             seed.bytes("adv-details", 90),
		AccountSignatureKey: seed.bytes("adv-account-key", 32),
		AccountSignature:    seed.bytes("adv-account-signature", 64),
		DeviceSignature:     seed.bytes("adv-device-signature", 64),
	}
	c.mu.Unlock()
	fail := func(err error) (types.JID, error) {
		c.mu.Lock()
		dev.ID, dev.LID = nil, types.EmptyJID
		c.mu.Unlock()
		return types.EmptyJID, fmt.Errorf("sandbox: link: %w", err)
	}
	if err := dev.Save(ctx); err != nil {
		return fail(err)
	}
	if err := c.srv.setDevice(ctx, jid, deviceLinked); err != nil {
		return fail(err)
	}
	if err := c.afterLink(ctx, dev); err != nil {
		c.log.Warn("sandbox: store traffic after pairing", "err", err)
	}
	c.log.Info("sandbox: device linked", "jid", logging.MaskJID(jid.String()))
	c.dispatch(&events.PairSuccess{ID: jid, LID: lid, Platform: "android"})
	c.goOn(sock, func() { c.login(sock, dev) })
	return jid, nil
}

// Fault kinds (P.sandbox.fault).
const (
	FaultDisconnect        = "disconnect"
	FaultKeepaliveTimeout  = "keepalive_timeout"
	FaultStreamReplaced    = "stream_replaced"
	FaultLoggedOut         = "logged_out"
	FaultTemporaryBan      = "temporary_ban"
	FaultClientOutdated    = "client_outdated"
	FaultConnectFailure    = "connect_failure"
	FaultDialHang          = "dial_hang"
	FaultRelease           = "release"
	FaultClear             = "clear"
	FaultSendNotOnWhatsApp = "send_not_on_whatsapp"
	FaultSendRateLimited   = "send_rate_limited"
)

// FaultKinds lists the kinds in documentation order.
var FaultKinds = []string{FaultDisconnect, FaultKeepaliveTimeout, FaultStreamReplaced, FaultLoggedOut,
	FaultTemporaryBan, FaultClientOutdated, FaultConnectFailure, FaultDialHang, FaultRelease, FaultClear,
	FaultSendNotOnWhatsApp, FaultSendRateLimited}

// Fault is one P.sandbox.fault; only the fields of its kind count.
type Fault struct {
	Kind     string
	Code     int           // temporary_ban (default 101), connect_failure (default 503)
	Message  string        // connect_failure
	Expire   time.Duration // temporary_ban; zero: no stated expiry (the server bans for an hour)
	Duration time.Duration // keepalive_timeout: pings fail this long; zero: until the socket is dropped
	// Count: send refusals, connect_failure: logins that fail,
	// client_outdated: versions refused from the one presented now (all
	// default 1).
	Count int
}

// unstatedBan is how long the server bans when the fault names no expiry.
const unstatedBan = time.Hour

// Fault makes WhatsApp misbehave as told; see the kinds above and
// docs/sandbox.md.
func (s *Server) Fault(ctx context.Context, f Fault) error {
	c := s.current()
	needConn := func() error {
		if c == nil || !c.IsConnected() {
			return bad("%s: the gateway is not connected and logged in", f.Kind)
		}
		return nil
	}
	switch f.Kind {
	case FaultDisconnect:
		if err := needConn(); err != nil {
			return err
		}
		c.serverClose(&events.Disconnected{})
	case FaultStreamReplaced:
		if err := needConn(); err != nil {
			return err
		}
		c.serverClose(&events.StreamReplaced{})
	case FaultKeepaliveTimeout:
		if err := needConn(); err != nil {
			return err
		}
		if f.Duration < 0 {
			return bad("duration: not negative")
		}
		return c.keepaliveOutage(f.Duration)
	case FaultLoggedOut:
		if c == nil {
			return bad("logged_out: the gateway has no session store open")
		}
		jid := c.JID()
		if jid.IsEmpty() {
			return bad("logged_out: the device is not linked")
		}
		if err := s.setDevice(ctx, jid, deviceLoggedOut); err != nil {
			return err
		}
		c.mu.Lock()
		sock, dev := c.sock, c.dev
		c.mu.Unlock()
		if sock != nil {
			c.closeSocket(sock, true)
			c.forget(ctx, dev)
			// whatsmeow's device_removed stream error: reason 401.
			c.dispatch(&events.LoggedOut{OnConnect: false, Reason: events.ConnectFailureLoggedOut})
		}
	case FaultTemporaryBan:
		if f.Code == 0 {
			f.Code = int(events.TempBanSentToTooManyPeople)
		}
		if f.Expire < 0 {
			return bad("expire: not negative")
		}
		until := f.Expire
		if until == 0 {
			until = unstatedBan
		}
		// WhatsApp bans in answer to a login (a 402 failure): the open
		// socket is left alone; every login while the ban lasts meets it.
		if err := s.setMeta(ctx, "ban_until", strconv.FormatInt(s.clock.Now().Add(until).UnixNano(), 10),
			"ban_code", strconv.Itoa(f.Code), "ban_stated", boolMeta(f.Expire > 0)); err != nil {
			return err
		}
	case FaultClientOutdated:
		// WhatsApp says "outdated" only in answer to a login (a 405
		// failure): the open socket is left alone.
		if err := s.outdate(ctx, max(f.Count, 1)); err != nil {
			return err
		}
	case FaultConnectFailure:
		if f.Code == 0 {
			f.Code = int(events.ConnectFailureServiceUnavailable)
		}
		switch {
		case f.Code < 400 || f.Code > 599:
			return bad("code: a connect failure reason from 400 to 599")
		case f.Code == int(events.ConnectFailureTempBanned):
			return bad("code: 402 is a temporary ban; use the temporary_ban fault")
		case f.Code == int(events.ConnectFailureClientOutdated):
			return bad("code: 405 is client outdated; use the client_outdated fault")
		}
		// WhatsApp sends <failure> only in answer to a login: the next
		// Count logins (at least one) meet it; a connected socket is left
		// alone (a disconnect fault makes the gateway log in again).
		s.mu.Lock()
		s.failN, s.failRes = max(f.Count, 1), f
		s.mu.Unlock()
	case FaultDialHang:
		s.mu.Lock()
		if s.hang == nil {
			s.hang = make(chan struct{})
		}
		s.mu.Unlock()
		if c != nil {
			c.serverClose(&events.Disconnected{})
		}
	case FaultRelease:
		s.release()
	case FaultClear:
		s.release()
		s.mu.Lock()
		s.refuse, s.refuseN = "", 0
		s.mu.Unlock()
		if _, err := s.db.ExecContext(ctx, `DELETE FROM meta WHERE k IN ('min_version', 'latest_version', 'ban_until', 'ban_code', 'ban_stated')`); err != nil {
			return fmt.Errorf("sandbox: clear: %w", err)
		}
	case FaultSendNotOnWhatsApp, FaultSendRateLimited:
		s.mu.Lock()
		s.refuse, s.refuseN = f.Kind, max(f.Count, 1)
		s.mu.Unlock()
	default:
		return bad("kind: unknown %q (want one of %s)", f.Kind, strings.Join(FaultKinds, ", "))
	}
	s.log.Info("sandbox: fault", "kind", f.Kind)
	return nil
}

// release ends hung dials and disarms dial faults.
func (s *Server) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hang != nil {
		close(s.hang)
		s.hang = nil
	}
	s.failN = 0
}

func boolMeta(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

func (s *Server) setMeta(ctx context.Context, kv ...string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	for i := 0; i+1 < len(kv); i += 2 {
		if err := putMeta(ctx, tx, kv[i], kv[i+1]); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// Keepalive timing, as whatsmeow's keepAliveLoop: a ping every 20 to 30 s
// (KeepAliveIntervalMin..Max, whole milliseconds), counted from the end of
// the previous one, and 10 s (KeepAliveResponseDeadline) for its answer.
const (
	keepaliveIntervalMin = 20 * time.Second
	keepaliveIntervalMax = 30 * time.Second
	keepaliveDeadline    = 10 * time.Second
)

func (c *Client) keepaliveInterval() time.Duration {
	span := (keepaliveIntervalMax - keepaliveIntervalMin).Milliseconds()
	return keepaliveIntervalMin + time.Duration(c.srv.seed.rng("keepalive").Int64N(span))*time.Millisecond
}

// keepaliveOutage makes the socket's pings go unanswered from now on: the
// first ping after now (pings have run every 20 to 30 s since login, all
// answered) times out 10 s after it was sent, and KeepAliveTimeout carries
// the time of the last answered ping, as whatsmeow's keepAliveLoop does;
// each later ping follows 20 to 30 s after the previous one timed out.
// After d (zero: never) the next ping is answered: KeepAliveRestored if
// any had failed. A closing socket ends it.
func (c *Client) keepaliveOutage(d time.Duration) error {
	clock := c.srv.clock
	c.mu.Lock()
	s := c.sock
	if s == nil || s.outage || !s.loggedIn {
		c.mu.Unlock()
		return bad("keepalive_timeout: no socket, or an outage is already under way")
	}
	s.outage = true
	lastOK := s.pingOK
	c.mu.Unlock()
	start := clock.Now()
	ping := lastOK.Add(c.keepaliveInterval())
	for !ping.After(start) {
		lastOK = ping
		ping = lastOK.Add(c.keepaliveInterval())
	}
	// wait sleeps on the injected clock until at; false if the socket closed.
	wait := func(at time.Time) bool {
		t := clock.NewTimer(at.Sub(clock.Now()))
		defer t.Stop()
		select {
		case <-s.ctx.Done():
			return false
		case <-t.Chan():
			return true
		}
	}
	c.goOn(s, func() {
		defer func() {
			c.mu.Lock()
			s.outage = false
			c.mu.Unlock()
		}()
		for n := 1; ; n++ {
			if d > 0 && !ping.Before(start.Add(d)) {
				if !wait(ping) {
					return
				}
				c.mu.Lock()
				s.pingOK = ping
				c.mu.Unlock()
				if n > 1 {
					c.dispatch(&events.KeepAliveRestored{})
				}
				return
			}
			failed := ping.Add(keepaliveDeadline)
			if !wait(failed) {
				return
			}
			c.dispatch(&events.KeepAliveTimeout{ErrorCount: n, LastSuccess: lastOK})
			ping = failed.Add(c.keepaliveInterval())
		}
	})
	return nil
}
