// Package health is the HTTP face of BLACKSKY-MD: liveness, readiness,
// status, Prometheus metrics, the pair page and River UI, all fed by the
// heartbeats and events other services publish on the bus.
package health

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

// StateDisconnected is the WhatsApp state after a conn.disconnected event,
// until the gateway says what it does next.
const StateDisconnected = "disconnected"

// StateUnknown is the WhatsApp state before the gateway has said anything.
const StateUnknown = "unknown"

// beat is the last heartbeat of one instance of a service. Only the fields
// health reads are kept, never the sender's details: whatever a heartbeat
// carries, an instance costs a bounded few hundred bytes.
type beat struct {
	instance string
	state    string
	standby  bool
	seen     time.Time // our clock at reception: other processes' clocks may drift
}

// Limits on what the bus can make health hold. Anything that can publish on
// the bus can send heartbeats: these keep memory and /status bounded
// whatever it sends.
const (
	// maxHeartbeatBytes refuses a heartbeat larger than any of ours (a
	// gateway's, the largest, carries a QR code: under 1 KB).
	maxHeartbeatBytes = 8 << 10
	// maxInstances per service: a gateway and a standby, a few dyno
	// restarts within forgetAfter. Past it the least recently seen goes.
	maxInstances = 8
	// maxNameLen bounds an instance name and a state word.
	maxNameLen = 64
	// maxTextLen bounds free text kept from events (disconnect reasons,
	// backup errors) and codes (a QR code is about 250 characters).
	maxTextLen = 512
	// maxFutureSkew: an event stamped further ahead of our clock is refused.
	// Its time orders it against others (a heartbeat never undoes a newer
	// event), so a forged far-future time would freeze the state for good.
	maxFutureSkew = 5 * time.Second
)

// waState is what we know of the WhatsApp connection. JID and codes are kept
// whole here and masked or withheld on the way out.
type waState struct {
	state   string
	stateAt time.Time
	// srcAt is the sender's time of the message that set state. Heartbeats
	// and conn events arrive on different subscriptions, so a beat sent just
	// before an event may be handled after it; it must not undo it.
	srcAt          time.Time
	jid            string
	paired         bool // a conn.paired event was seen (or the gateway reported a JID)
	connectedSince *time.Time
	reconnects     int64 // the gateway's own count, from its heartbeat
	reconnectsSeen int64 // conn.reconnecting events seen here
	lastDisconnect string
	lastDiscAt     *time.Time
	qr             string
	qrExpires      *time.Time
	qrVersion      int64
	pairCode       string
}

// backupState is the newest snapshot and error we heard of.
type backupState struct {
	lastID     int64
	lastAt     *time.Time
	lastBytes  int64
	lastReason string
	lastErr    string
	lastErrAt  *time.Time
}

// Tracker follows every service's heartbeat and the connection and backup
// events. It is safe for concurrent use: NATS handlers write, HTTP reads.
type Tracker struct {
	clock    clockwork.Clock
	log      *slog.Logger
	staleAge time.Duration
	metrics  *metrics

	mu    sync.RWMutex
	beats map[string]map[string]*beat // service -> instance -> last beat
	// handled counts messages by kind ("heartbeat.gateway", "conn", ...), so
	// tests wait for the one they sent instead of sleeping.
	handled map[string]int64
	wa      waState
	backup  backupState
	relay   relayState
	// replication is the lease holder's continuous replication figures.
	replication replicationState
}

// forgetAfter drops an instance that has not beaten for this long.
const forgetAfter = 10 * time.Minute

// NewTracker returns a tracker; interval is the heartbeat interval (zero:
// bus.HeartbeatInterval), stale after bus.StaleAfter intervals.
func NewTracker(clock clockwork.Clock, interval time.Duration, log *slog.Logger) *Tracker {
	if interval <= 0 {
		interval = bus.HeartbeatInterval
	}
	return &Tracker{
		clock:    clock,
		log:      log,
		staleAge: bus.StaleAfter * interval,
		beats:    map[string]map[string]*beat{},
		handled:  map[string]int64{},
		wa:       waState{state: StateUnknown},
	}
}

// Subscribe listens to P.heartbeat.*, P.conn.*, P.backup.done and
// P.backup.failed. The caller unsubscribes.
func (t *Tracker) Subscribe(nc *nats.Conn, subj bus.Subjects) ([]*nats.Subscription, error) {
	handlers := []struct {
		subject string
		fn      func(*nats.Msg)
	}{
		{subj.HeartbeatAll(), func(m *nats.Msg) { t.HandleHeartbeat(m.Data) }},
		{subj.ConnAll(), func(m *nats.Msg) { t.HandleConn(bus.Kind(m.Subject), m.Data) }},
		{subj.BackupDone(), func(m *nats.Msg) { t.HandleBackupDone(m.Data) }},
		{subj.BackupFailed(), func(m *nats.Msg) { t.HandleBackupFailed(m.Data) }},
	}
	var subs []*nats.Subscription
	for _, h := range handlers {
		s, err := nc.Subscribe(h.subject, h.fn)
		if err != nil {
			for _, s := range subs {
				_ = s.Unsubscribe()
			}
			return nil, fmt.Errorf("subscribe %s: %w", h.subject, err)
		}
		subs = append(subs, s)
	}
	// Flush so the subscriptions are known to the server before we report
	// ourselves started: an event published right after is not lost. Never
	// for long: /healthz must answer even while the bus is down, and the
	// client sends the subscriptions again when it (re)connects.
	if nc.IsConnected() {
		if err := nc.FlushTimeout(subscribeFlushTimeout); err != nil {
			t.log.Warn("nats flush after subscribe", "err", err)
		}
	} else {
		t.log.Warn("nats not connected; health subscribes when it is", "status", nc.Status().String())
	}
	return subs, nil
}

// subscribeFlushTimeout bounds how long Subscribe waits for the server to
// confirm the subscriptions.
const subscribeFlushTimeout = time.Second

// HandleHeartbeat records one P.heartbeat.<service> payload. Only our own
// services are kept (health lists nothing a sender made up), with at most
// maxInstances instances each.
func (t *Tracker) HandleHeartbeat(data []byte) {
	hb, why := t.decodeHeartbeat(data)
	if why != "" {
		t.log.Debug("ignoring a heartbeat", "why", why)
		t.count("heartbeat")
		return
	}
	now := t.clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.handled["heartbeat."+hb.Service]++
	t.forgetLocked(now)
	inst := t.beats[hb.Service]
	if inst == nil {
		inst = map[string]*beat{}
		t.beats[hb.Service] = inst
	}
	if _, ok := inst[hb.Instance]; !ok && len(inst) >= maxInstances {
		var oldest *beat
		for _, b := range inst {
			if oldest == nil || b.seen.Before(oldest.seen) {
				oldest = b
			}
		}
		delete(inst, oldest.instance)
	}
	inst[hb.Instance] = &beat{instance: hb.Instance, state: hb.State, standby: isStandby(hb), seen: now}
	switch hb.Service {
	case bus.ServiceGateway:
		t.gatewayBeatLocked(hb, now)
	case bus.ServiceBackup:
		t.backupBeatLocked(hb)
	case bus.ServiceRelay:
		t.relayBeatLocked(hb)
	}
}

// decodeHeartbeat reads a heartbeat and says why it is refused ("" when not).
func (t *Tracker) decodeHeartbeat(data []byte) (bus.Heartbeat, string) {
	var hb bus.Heartbeat
	if len(data) > maxHeartbeatBytes {
		return hb, fmt.Sprintf("%d bytes, over the %d-byte limit", len(data), maxHeartbeatBytes)
	}
	if err := json.Unmarshal(data, &hb); err != nil {
		return hb, err.Error()
	}
	switch {
	case !slices.Contains(knownServices, hb.Service):
		return hb, "not one of our services"
	case len(hb.Instance) > maxNameLen || len(hb.State) > maxNameLen:
		return hb, "instance or state name too long"
	case t.future(hb.At):
		return hb, "stamped in the future"
	}
	return hb, ""
}

// future reports whether a sender's time is too far ahead of our clock.
func (t *Tracker) future(at time.Time) bool {
	return at.After(t.clock.Now().Add(maxFutureSkew))
}

// forgetLocked drops instances that have not beaten for forgetAfter, so
// restarts (new Heroku dyno names) do not pile up in /status.
func (t *Tracker) forgetLocked(now time.Time) {
	for _, inst := range t.beats {
		for name, b := range inst {
			if now.Sub(b.seen) > forgetAfter {
				delete(inst, name)
			}
		}
	}
}

func (t *Tracker) gatewayBeatLocked(hb bus.Heartbeat, now time.Time) {
	var d bus.GatewayDetails
	if len(hb.Details) > 0 {
		if err := json.Unmarshal(hb.Details, &d); err != nil {
			t.log.Debug("ignoring bad gateway heartbeat details", "err", err)
			return
		}
	}
	if len(d.WAState) > maxNameLen {
		t.log.Debug("ignoring gateway heartbeat details: state name too long")
		return
	}
	state := d.WAState
	if state == "" {
		state = hb.State
	}
	// A second gateway waiting for the lease beats too; it must not hide the
	// state of the one that holds the session.
	if state == bus.StateStandby && t.activeGatewayLocked(now, hb.Instance) {
		return
	}
	if hb.At.Before(t.wa.srcAt) {
		return // older than the event we already applied; the next beat is due in 5 s
	}
	t.wa.srcAt = hb.At
	t.setStateLocked(state, now)
	t.gatewayRelayLocked(d)
	if d.JID != "" {
		t.wa.jid, t.wa.paired = clip(d.JID), true
	}
	if d.ConnectedSince != nil {
		t.wa.connectedSince = d.ConnectedSince
	}
	t.wa.reconnects = d.Reconnects
	if d.LastDisconnect != "" && d.LastDisconnect != t.wa.lastDisconnect {
		t.wa.lastDisconnect = clip(d.LastDisconnect)
		at := hb.At
		t.wa.lastDiscAt = &at
	}
	if state == bus.StatePairing {
		if d.QRCode != "" {
			t.setQRLocked(d.QRCode, d.QRExpiresAt)
		}
		if d.PairCode != "" && len(d.PairCode) <= maxNameLen {
			t.wa.pairCode = d.PairCode
		}
	}
}

// activeGatewayLocked reports whether a gateway other than instance beats
// freshly and is not in standby.
func (t *Tracker) activeGatewayLocked(now time.Time, instance string) bool {
	for name, b := range t.beats[bus.ServiceGateway] {
		if name != instance && now.Sub(b.seen) < t.staleAge && !b.standby {
			return true
		}
	}
	return false
}

func isStandby(hb bus.Heartbeat) bool {
	if hb.State == bus.StateStandby {
		return true
	}
	var d bus.GatewayDetails
	_ = json.Unmarshal(hb.Details, &d)
	return d.WAState == bus.StateStandby
}

func (t *Tracker) backupBeatLocked(hb bus.Heartbeat) {
	var d bus.BackupDetails
	if len(hb.Details) == 0 {
		return
	}
	if err := json.Unmarshal(hb.Details, &d); err != nil {
		t.log.Debug("ignoring bad backup heartbeat details", "err", err)
		return
	}
	// These times order snapshots and errors too: one far ahead would hide
	// every real one after it.
	if d.LastSnapshotAt != nil && t.future(*d.LastSnapshotAt) {
		d.LastSnapshotID, d.LastSnapshotAt = 0, nil
	}
	if d.LastErrorAt != nil && t.future(*d.LastErrorAt) {
		d.LastError, d.LastErrorAt = "", nil
	}
	if d.LastSnapshotID != 0 && (t.backup.lastAt == nil || (d.LastSnapshotAt != nil && !d.LastSnapshotAt.Before(*t.backup.lastAt))) {
		t.backup.lastID, t.backup.lastAt, t.backup.lastBytes = d.LastSnapshotID, d.LastSnapshotAt, d.LastSnapshotBytes
	}
	if d.LastError != "" && (t.backup.lastErrAt == nil || (d.LastErrorAt != nil && d.LastErrorAt.After(*t.backup.lastErrAt))) {
		t.backup.lastErr, t.backup.lastErrAt = clip(d.LastError), d.LastErrorAt
	}
	t.replicationBeatLocked(hb, d)
}
