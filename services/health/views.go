package health

import (
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

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
	if req.Heartbeats {
		reasons = append(reasons, t.relayReasons(wa)...)
	}
	return len(reasons) == 0, reasons
}
