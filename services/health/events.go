package health

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// HandleConn records one P.conn.<kind> event.
func (t *Tracker) HandleConn(kind string, data []byte) {
	defer t.count("conn")
	ev, err := bus.DecodeConnEvent(kind, data)
	if err != nil {
		t.log.Debug("ignoring a bad conn event", "kind", kind, "err", err)
		return
	}
	if t.future(ev.At) {
		t.log.Debug("ignoring a conn event stamped in the future", "kind", kind)
		return
	}
	if t.metrics != nil {
		t.metrics.connEvent(ev.Kind)
	}
	now := t.clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	at := ev.At
	if at.IsZero() {
		at = now
	}
	if at.After(t.wa.srcAt) {
		t.wa.srcAt = at
	}
	ev.Reason, ev.JID = clip(ev.Reason), clip(ev.JID)
	disconnect := func(why string) {
		t.wa.lastDisconnect = clip(why)
		t.wa.lastDiscAt = &at
	}
	switch ev.Kind {
	case bus.ConnConnecting:
		t.setStateLocked(bus.StateConnecting, now)
	case bus.ConnConnected:
		t.setStateLocked(bus.StateConnected, now)
		t.wa.connectedSince = &at
	case bus.ConnKeepaliveRestored:
		t.setStateLocked(bus.StateConnected, now)
	case bus.ConnDisconnected:
		t.setStateLocked(StateDisconnected, now)
		disconnect(cmp.Or(ev.Reason, "disconnected"))
	case bus.ConnReconnecting:
		t.setStateLocked(bus.StateReconnecting, now)
		t.wa.reconnectsSeen++
	case bus.ConnQR:
		t.setStateLocked(bus.StatePairing, now)
		t.setQRLocked(ev.Code, ev.ExpiresAt)
	case bus.ConnPairCode:
		t.setStateLocked(bus.StatePairing, now)
		if len(ev.Code) <= maxNameLen {
			t.wa.pairCode = ev.Code
		}
	case bus.ConnPaired:
		// whatsmeow reconnects after a successful pairing; "connected" follows.
		t.setStateLocked(bus.StateConnecting, now)
		t.wa.jid, t.wa.paired = ev.JID, true
	case bus.ConnLoggedOut:
		t.setStateLocked(bus.StateLoggedOut, now)
		disconnect(strings.TrimSpace("logged out " + ev.Reason))
	case bus.ConnStreamReplaced:
		t.setStateLocked(bus.StateStreamReplaced, now)
		disconnect("stream replaced by another client")
	case bus.ConnKeepaliveTimeout:
		disconnect("keepalive timeout")
	case bus.ConnTemporaryBan:
		t.setStateLocked(bus.StateBanned, now)
		disconnect(strings.TrimSpace("temporary ban " + clip(ev.Code)))
	case bus.ConnClientOutdated:
		t.setStateLocked(bus.StateOutdated, now)
		disconnect("client outdated")
	case bus.ConnConnectFailure:
		disconnect(strings.TrimSpace("connect failure " + ev.Reason))
	case bus.ConnStandby:
		if !t.activeGatewayLocked(now, "") {
			t.setStateLocked(bus.StateStandby, now)
		}
	case bus.ConnStopped:
		t.setStateLocked(bus.StateStopped, now)
	}
}

func (t *Tracker) count(kind string) {
	t.mu.Lock()
	t.handled[kind]++
	t.mu.Unlock()
}

func (t *Tracker) handledCount(kind string) int64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.handled[kind]
}

// setStateLocked changes the WhatsApp state; leaving pairing drops the codes
// (they are useless once linked), logging out drops the JID.
func (t *Tracker) setStateLocked(state string, now time.Time) {
	if state == "" {
		return
	}
	t.wa.state, t.wa.stateAt = state, now
	if state != bus.StatePairing {
		t.wa.qr, t.wa.qrExpires, t.wa.pairCode = "", nil, ""
	}
	if state != bus.StateConnected {
		t.wa.connectedSince = nil
	}
	if state == bus.StateLoggedOut {
		t.wa.jid, t.wa.paired = "", false
	}
}

// clip bounds text kept from the bus.
func clip(s string) string {
	if len(s) > maxTextLen {
		return s[:maxTextLen]
	}
	return s
}

func (t *Tracker) setQRLocked(code string, expires *time.Time) {
	if code == "" || code == t.wa.qr || len(code) > maxTextLen {
		return
	}
	t.wa.qr, t.wa.qrExpires = code, expires
	t.wa.qrVersion = QRVersion(code)
}

// QRVersion names a QR code for the pair page, which swaps its image when
// the version changes. It is derived from the code itself, not counted, so a
// restarted health service never offers an old version number for a new
// code; it fits in 53 bits (a JavaScript number) and is never zero (no QR).
func QRVersion(code string) int64 {
	sum := sha256.Sum256([]byte("blacksky-qr-version\x00" + code))
	v := int64(binary.BigEndian.Uint64(sum[:8]) >> 11)
	if v == 0 {
		v = 1
	}
	return v
}

// HandleBackupDone records a P.backup.done event.
func (t *Tracker) HandleBackupDone(data []byte) {
	defer t.count("backup")
	ev, err := bus.DecodeBackupDone(data)
	if err != nil {
		t.log.Debug("ignoring a bad backup.done", "err", err)
		return
	}
	if t.future(ev.At) {
		// Its time orders later heartbeats' snapshots against it.
		t.log.Debug("ignoring a backup.done stamped in the future")
		return
	}
	if t.metrics != nil {
		t.metrics.backupDone(ev)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	at := ev.At
	if at.IsZero() {
		at = t.clock.Now().UTC()
	}
	t.backup.lastID, t.backup.lastAt, t.backup.lastBytes, t.backup.lastReason = ev.SnapshotID, &at, ev.Bytes, clip(ev.Reason)
}

// HandleBackupFailed records a P.backup.failed event.
func (t *Tracker) HandleBackupFailed(data []byte) {
	defer t.count("backup")
	ev, err := bus.DecodeBackupFailed(data)
	if err != nil {
		t.log.Debug("ignoring a bad backup.failed", "err", err)
		return
	}
	if t.future(ev.At) {
		t.log.Debug("ignoring a backup.failed stamped in the future")
		return
	}
	if t.metrics != nil {
		t.metrics.backupFailed(ev)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	at := ev.At
	if at.IsZero() {
		at = t.clock.Now().UTC()
	}
	t.backup.lastErr, t.backup.lastErrAt = clip(ev.Error), &at
}
