// Package health is the HTTP face of BLACKSKY-MD: liveness, readiness,
// status, Prometheus metrics, the pair page and River UI, all fed by the
// heartbeats and events other services publish on the bus.
package health

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
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
}

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

// ServiceView is one service as /status shows it.
type ServiceView struct {
	Name     string
	State    string
	Instance string
	Age      time.Duration
	Fresh    bool
	Seen     bool // at least one heartbeat arrived
	Others   int  // further instances beating (a standby gateway, say)
}

// serviceLocked summarises the instances of one service: a fresh beat wins
// over a stale one, an active one over a standby, then the newest.
func (t *Tracker) serviceLocked(name string, now time.Time) ServiceView {
	rank := func(b *beat) int {
		r := 0
		if now.Sub(b.seen) < t.staleAge {
			r += 2
		}
		if !b.standby {
			r++
		}
		return r
	}
	var best *beat
	bestRank, others := -1, 0
	for _, b := range t.beats[name] {
		if best != nil {
			others++
		}
		r := rank(b)
		if best == nil || r > bestRank || (r == bestRank && b.seen.After(best.seen)) {
			best, bestRank = b, r
		}
	}
	if best == nil {
		return ServiceView{Name: name, State: StateMissing}
	}
	age := now.Sub(best.seen)
	return ServiceView{Name: name, State: best.state, Instance: best.instance, Age: age,
		Fresh: age < t.staleAge, Seen: true, Others: others}
}

// Service returns the view of one service ("missing" when never heard).
func (t *Tracker) Service(name string) ServiceView {
	now := t.clock.Now()
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.serviceLocked(name, now)
}

// Services returns every one of our services that has beaten, plus those
// named in want, sorted by name.
func (t *Tracker) Services(want ...string) []ServiceView {
	now := t.clock.Now()
	t.mu.RLock()
	defer t.mu.RUnlock()
	names := map[string]bool{}
	for n := range t.beats {
		names[n] = true
	}
	for _, n := range want {
		names[n] = true
	}
	out := make([]ServiceView, 0, len(names))
	for n := range names {
		out = append(out, t.serviceLocked(n, now))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// WhatsApp is the connection as /status and the pair page see it. JID is
// whole: callers mask it.
type WhatsApp struct {
	State          string
	JID            string
	Paired         bool
	ConnectedSince *time.Time
	Reconnects     int64
	LastDisconnect string
	LastDiscAt     *time.Time
	QR             string
	QRExpiresAt    *time.Time
	QRVersion      int64
	PairCode       string
}

// WhatsApp returns the current connection view.
func (t *Tracker) WhatsApp() WhatsApp {
	t.mu.RLock()
	defer t.mu.RUnlock()
	w := t.wa
	return WhatsApp{State: w.state, JID: w.jid, Paired: w.paired, ConnectedSince: w.connectedSince,
		Reconnects: max(w.reconnects, w.reconnectsSeen), LastDisconnect: w.lastDisconnect,
		LastDiscAt: w.lastDiscAt, QR: w.qr, QRExpiresAt: w.qrExpires, QRVersion: w.qrVersion, PairCode: w.pairCode}
}

// Backup is the newest snapshot and error heard of.
type Backup struct {
	LastID     int64
	LastAt     *time.Time
	LastBytes  int64
	LastReason string
	LastErr    string
	LastErrAt  *time.Time
}

// Backup returns the backup view.
func (t *Tracker) Backup() Backup {
	t.mu.RLock()
	defer t.mu.RUnlock()
	b := t.backup
	return Backup{LastID: b.lastID, LastAt: b.lastAt, LastBytes: b.lastBytes, LastReason: b.lastReason,
		LastErr: b.lastErr, LastErrAt: b.lastErrAt}
}

// Requirements say which services readiness waits for.
type Requirements struct {
	// Heartbeats: when false (ENABLE_HEALTH_CHECK=false) readiness ignores
	// heartbeats and only a known, bad WhatsApp state makes it fail.
	Heartbeats bool
	Services   []string // enabled services whose heartbeat must be fresh
}

// Ready reports readiness and, when not ready, why (one reason a line).
func (t *Tracker) Ready(req Requirements) (bool, []string) {
	var reasons []string
	if req.Heartbeats {
		for _, s := range t.Services(req.Services...) {
			if !slices.Contains(req.Services, s.Name) {
				continue
			}
			switch {
			case !s.Seen:
				reasons = append(reasons, s.Name+": no heartbeat yet")
			case !s.Fresh:
				reasons = append(reasons, fmt.Sprintf("%s: heartbeat stale (last one %s ago, limit %s)",
					s.Name, s.Age.Round(time.Second), t.staleAge))
			}
		}
	}
	wa := t.WhatsApp()
	switch {
	case wa.State == bus.StateConnected || wa.State == bus.StatePairing:
		// Good, as far as we know; with a stale gateway heartbeat the state is
		// old news, and the stale reason above already fails readiness.
	case wa.State == StateUnknown:
		if req.Heartbeats {
			reasons = append(reasons, "whatsapp: state unknown (nothing heard from the gateway yet)")
		}
	default:
		reasons = append(reasons, "whatsapp: "+wa.State)
	}
	return len(reasons) == 0, reasons
}
