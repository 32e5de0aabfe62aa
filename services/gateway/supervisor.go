package gateway

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types/events"
)

// QR code lifetimes, as WhatsApp issues them (and whatsmeow's QR channel
// rotates them): the first code lives 60 s, the following ones 20 s each.
const (
	firstQRTTL = 60 * time.Second
	nextQRTTL  = 20 * time.Second
)

// supervise is the state machine: restore, open, then connect and react to
// events and timers until ctx ends. Only this goroutine connects. When backup
// loses the session lease to another instance (it says so on conn.standby),
// the socket is closed and the whole cycle starts again from the restore: two
// sockets must never fight over one session (CONTRACT guarantee 2).
func (g *Gateway) supervise(ctx context.Context) error {
	for {
		if g.cfg.BackupEnabled {
			if err := g.awaitRestore(ctx); err != nil {
				return nil // only ctx ends the wait
			}
		}
		err := g.session(ctx)
		if !errors.Is(err, errLeaseLost) {
			return err
		}
		g.log.Warn("backup lost the session lease to another instance: socket closed, waiting for the session again")
		g.closeConn()
		g.events.drain() // what the closed socket said no longer matters
	}
}

// errLeaseLost ends a session: another instance holds the lease now.
var errLeaseLost = errors.New("session lease lost")

// session opens the store and runs one connection cycle until ctx ends or
// the lease is lost.
func (g *Gateway) session(ctx context.Context) error {
	conn, err := g.open(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("gateway: open session store: %w", err)
	}
	conn.OnEventWithSuccess(g.onEvent)
	g.mu.Lock()
	g.conn = conn
	g.mu.Unlock()
	g.lc = conn
	defer func() {
		g.stopTimers()
		stopTimer(&g.retry)
		stopTimer(&g.redeliverTimer)
		g.bg.Wait() // pairing-code requests end with ctx
	}()

	// Backup publishes conn.standby when it loses the lease while we hold
	// the socket.
	leaseLost := make(chan struct{}, 1)
	if g.cfg.BackupEnabled {
		sub, err := g.nc.Subscribe(g.subj.Conn(bus.ConnStandby), func(m *nats.Msg) {
			if !g.ownStandby(m) {
				return
			}
			select {
			case leaseLost <- struct{}{}:
			default:
			}
		})
		if err != nil {
			g.log.Warn("subscribe conn.standby", "err", err)
		} else {
			defer func() { _ = sub.Unsubscribe() }()
		}
	}

	// A socket can die without an event (whatsmeow's own reconnect after
	// pairing fails silently, for one): check it now and then.
	live := g.clock.NewTicker(g.cfg.LivenessInterval)
	defer live.Stop()
	hint := g.clock.NewTicker(g.cfg.PairHintEvery)
	defer hint.Stop()
	g.pairHint()

	g.connect(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-leaseLost:
			g.lc.Disconnect()
			g.setState(bus.StateStandby, "another instance holds the session lease")
			return errLeaseLost
		case <-live.Chan():
			if g.State() == bus.StateConnected && !g.lc.IsConnected() {
				g.fail("socket closed without a disconnect event")
			}
			g.redeliver(ctx) // a signal while not yet connected
		case <-g.relayBack:
			g.redeliver(ctx)
		case <-timerC(g.redeliverTimer):
			g.redeliverTimer = nil
			g.redeliver(ctx)
		case <-hint.Chan():
			g.pairHint()
		case <-g.events.ready():
			for _, evt := range g.events.drain() {
				if ctx.Err() != nil {
					return nil
				}
				g.handle(ctx, evt)
			}
		case <-timerC(g.retry):
			g.retry = nil
			g.connect(ctx)
		case <-timerC(g.qrTimer):
			g.qrTimer = nil
			g.nextQR()
		case <-timerC(g.watch):
			g.watch = nil
			g.fail(fmt.Sprintf("no login or QR code within %s of opening the socket", g.cfg.LoginTimeout))
		case f := <-g.results:
			f(ctx)
		}
	}
}

// connect makes one attempt. The outcome comes as events (Connected, QR,
// Disconnected, ...) or as an error here; the watchdog covers a socket that
// opens and then says nothing.
func (g *Gateway) connect(ctx context.Context) {
	g.stopTimers()
	stopTimer(&g.retry)
	g.gen++
	g.pairAsked = false
	g.relay.newConnection()
	g.setState(bus.StateConnecting, "")
	attempt := g.attempt()
	g.publish(bus.ConnEvent{Kind: bus.ConnConnecting, Attempt: attempt})
	g.log.Info("connecting to WhatsApp", "attempt", attempt)
	err := g.lc.Connect(ctx)
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		g.fail("connect: " + err.Error())
		return
	}
	g.watch = g.clock.NewTimer(g.cfg.LoginTimeout)
}

// fail handles a transient failure: drop the socket and schedule one retry,
// counted as a reconnect. A retry already scheduled (or a terminal wait)
// absorbs further failures, so a burst of failure events never starts two
// connect attempts.
func (g *Gateway) fail(reason string) { g.dropAndRetry(reason, true) }

// dropAndRetry is fail; reconnect says whether the retry counts as a
// reconnect (a fresh pairing round does not).
func (g *Gateway) dropAndRetry(reason string, reconnect bool) {
	if g.retry != nil || g.State() == bus.StateOutdated {
		g.log.Debug("failure absorbed: a retry is already scheduled", "reason", reason)
		return
	}
	g.log.Warn("WhatsApp not connected; retrying", "reason", reason)
	g.drop(reason, reconnect)
}

// drop closes the socket and schedules the retry that reconnects it: the
// one way the supervisor reconnects, whether the socket failed or we chose
// to (redeliver.go).
func (g *Gateway) drop(reason string, reconnect bool) {
	g.stopTimers()
	g.lc.Disconnect()
	g.setState(bus.StateReconnecting, reason)
	g.scheduleRetry(0, reconnect)
}

// scheduleRetry counts an attempt (and a reconnect when reconnect is set:
// only after a lost or failed connection) and arms the retry timer: after
// wait, or after the backoff delay when wait is zero. The timer exists
// before the event is published, so whoever reacts to the event sees it
// armed.
func (g *Gateway) scheduleRetry(wait time.Duration, reconnect bool) {
	g.mu.Lock()
	g.st.attempt++
	if reconnect {
		g.st.reconnects++
	}
	n := g.st.attempt
	g.mu.Unlock()
	if wait <= 0 {
		wait = g.backoff.Delay(n)
	}
	stopTimer(&g.retry)
	g.retry = g.clock.NewTimer(wait)
	g.publish(bus.ConnEvent{Kind: bus.ConnReconnecting, Attempt: n, DelayMS: wait.Milliseconds()})
	g.log.Info("reconnect scheduled", "attempt", n, "delay", wait)
}

// handle is the one type switch over whatsmeow's events.
func (g *Gateway) handle(ctx context.Context, evt any) {
	switch e := evt.(type) {
	case *events.Connected:
		g.onConnected()
	case *events.Disconnected:
		g.publish(bus.ConnEvent{Kind: bus.ConnDisconnected})
		g.fail("disconnected")
	case *events.QR:
		g.onQR(ctx, e.Codes)
	case *events.PairSuccess:
		g.onPaired(e)
	case *events.PairError:
		g.log.Error("pairing failed after the scan", "err", e.Error)
	case *events.QRScannedWithoutMultidevice:
		g.log.Warn("QR code scanned by a phone without multi-device; enable it and scan again")
	case *events.LoggedOut:
		g.onLoggedOut(ctx, e)
	case *events.StreamReplaced:
		g.onStreamReplaced()
	case *events.TemporaryBan:
		g.onTemporaryBan(e)
	case *events.ClientOutdated:
		g.onClientOutdated(ctx)
	case *events.ConnectFailure:
		reason := e.Reason.String() // "409: client user agent was rejected"
		if e.Message != "" {
			reason += " (" + e.Message + ")"
		}
		g.publish(bus.ConnEvent{Kind: bus.ConnConnectFailure, Reason: reason})
		g.fail("connect failure " + reason)
	case *events.CATRefreshError:
		g.fail("CAT refresh failed")
	case *events.KeepAliveTimeout:
		g.onKeepAliveTimeout(e)
	case *events.KeepAliveRestored:
		g.publish(bus.ConnEvent{Kind: bus.ConnKeepaliveRestored})
		g.log.Info("keepalive restored")
	case *events.UndecryptableMessage:
		// whatsmeow asked the sender for it again (a retry receipt), or it
		// was a redelivery whose buffered plaintext is gone; see doc.go.
		g.log.Warn("incoming message could not be decrypted", "id", e.Info.ID, "unavailable", e.IsUnavailable)
	case *events.StreamError:
		g.log.Warn("unknown stream error from WhatsApp", "code", e.Code)
	}
}

func (g *Gateway) onConnected() {
	g.stopTimers()
	if !g.lc.IsConnected() {
		// The socket this login came from is already gone (we dropped it,
		// and a dropped socket emits no Disconnected): do not sit in
		// "connected" on a dead socket.
		g.fail("socket closed right after login")
		return
	}
	stopTimer(&g.retry) // whatever was pending, we are in
	jid := g.lc.JID().String()
	now := g.clock.Now()
	g.mu.Lock()
	offlineSince, lastDisconnect := g.st.offlineSince, g.st.lastDisconnect
	g.st.offlineSince = time.Time{}
	g.st.jid = jid
	g.mu.Unlock()
	g.setState(bus.StateConnected, "")
	g.publish(bus.ConnEvent{Kind: bus.ConnConnected, JID: jid})
	g.log.Info("connected to WhatsApp", "jid", logging.MaskJID(jid))

	if off := now.Sub(offlineSince); !offlineSince.IsZero() && off > g.cfg.OfflineAlertAfter {
		text := fmt.Sprintf("Back online after %s offline (last disconnect: %s).", off.Round(time.Second), cmp.Or(lastDisconnect, "unknown"))
		g.notifyOwner(text)
	}
	g.versionNote()
}

func (g *Gateway) onLoggedOut(ctx context.Context, e *events.LoggedOut) {
	reason := e.Reason.String()
	g.stopTimers()
	stopTimer(&g.retry)
	g.lc.Disconnect()
	g.setState(bus.StateLoggedOut, "logged out: "+reason)
	g.publish(bus.ConnEvent{Kind: bus.ConnLoggedOut, Reason: reason})
	g.log.Warn("logged out by WhatsApp or the phone; clearing the local device and pairing again", "reason", reason)
	if err := g.lc.ResetDevice(ctx); err != nil {
		g.log.Error("clearing the local device", "err", err)
	}
	g.mu.Lock()
	g.st.jid = ""
	g.st.attempt = 0
	g.mu.Unlock()
	g.scheduleRetry(0, false)
}

func (g *Gateway) onStreamReplaced() {
	g.stopTimers()
	stopTimer(&g.retry)
	g.lc.Disconnect()
	g.setState(bus.StateStreamReplaced, "stream replaced by another client")
	g.publish(bus.ConnEvent{Kind: bus.ConnStreamReplaced})
	g.log.Warn("another client took over this session; not fighting it", "retry_in", g.cfg.StreamReplacedWait)
	g.scheduleRetry(g.cfg.StreamReplacedWait, false)
}

func (g *Gateway) onTemporaryBan(e *events.TemporaryBan) {
	g.stopTimers()
	stopTimer(&g.retry)
	g.lc.Disconnect()
	wait := e.Expire
	ev := bus.ConnEvent{Kind: bus.ConnTemporaryBan, Code: strconv.Itoa(int(e.Code)), Reason: e.Code.String()}
	if wait > 0 {
		exp := g.clock.Now().Add(wait).UTC()
		ev.ExpiresAt = &exp
	} else {
		wait = g.cfg.BanFallbackWait
	}
	g.setState(bus.StateBanned, "temporary ban "+ev.Code)
	g.publish(ev)
	g.log.Error("temporarily banned by WhatsApp; waiting for the ban to expire", "code", ev.Code, "reason", ev.Reason, "retry_in", wait)
	g.scheduleRetry(wait, false)
}

func (g *Gateway) onClientOutdated(ctx context.Context) {
	g.stopTimers()
	stopTimer(&g.retry)
	g.lc.Disconnect()
	g.setState(bus.StateOutdated, "client outdated")
	g.publish(bus.ConnEvent{Kind: bus.ConnClientOutdated})
	g.refreshVersion(ctx) // version.go
}

func (g *Gateway) onKeepAliveTimeout(e *events.KeepAliveTimeout) {
	g.publish(bus.ConnEvent{Kind: bus.ConnKeepaliveTimeout, Attempt: e.ErrorCount,
		Reason: fmt.Sprintf("%d keepalive ping(s) unanswered", e.ErrorCount)})
	silent := g.clock.Since(e.LastSuccess)
	g.log.Warn("keepalive timeout", "errors", e.ErrorCount, "since_last_success", silent.Round(time.Second))
	// whatsmeow forces a reconnect after this long only when its own
	// auto-reconnect is on; ours is, so we do it.
	if !e.LastSuccess.IsZero() && silent > g.cfg.KeepaliveMaxFail {
		g.fail(fmt.Sprintf("no keepalive answer for %s", silent.Round(time.Second)))
	}
}

// setState moves the state machine, keeping the connection bookkeeping in
// one place: leaving "connected" notes when we went offline and resets the
// attempt counter if the connection had been stable.
func (g *Gateway) setState(state, reason string) {
	now := g.clock.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	old := g.st.state
	if old == bus.StateConnected && state != bus.StateConnected {
		if now.Sub(g.st.connectedSince) >= g.cfg.StableAfter {
			g.st.attempt = 0
		}
		g.st.offlineSince = now
		g.st.connectedSince = time.Time{}
	}
	if state == bus.StateConnected && old != bus.StateConnected {
		g.st.connectedSince = now
	}
	if state != bus.StatePairing {
		g.st.qrCode, g.st.qrExpires, g.st.pairCode = "", time.Time{}, ""
	}
	if reason != "" {
		g.st.lastDisconnect = reason
	}
	g.st.state = state
}

func (g *Gateway) attempt() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.st.attempt
}

// stopTimers stops the QR and watchdog timers (not the retry timer).
func (g *Gateway) stopTimers() {
	stopTimer(&g.qrTimer)
	stopTimer(&g.watch)
	g.qrCodes = nil
}

func stopTimer(t *clockwork.Timer) {
	if *t != nil {
		(*t).Stop()
		*t = nil
	}
}

// timerC is t's channel, or nil (never ready) when no timer is armed.
func timerC(t clockwork.Timer) <-chan time.Time {
	if t == nil {
		return nil
	}
	return t.Chan()
}
