package health

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/prometheus/client_golang/prometheus"
)

// relayState is relay's newest heartbeat details, and what the gateway says
// of its hand-overs to relay.
type relayState struct {
	seen    bool
	d       bus.RelayDetails // texts clipped
	unacked int64            // gateway: messages and receipts relay did not confirm
	gwErr   string           // gateway: the last hand-over failure
	gwErrAt *time.Time
}

// Readiness reasons about relay (CONTRACT section 4).
const (
	reasonRelayMissing = "relay not running: incoming messages are not acknowledged until it is back"
	reasonRelayDB      = "relay: database unavailable: incoming messages are not acknowledged until it answers"
)

func (t *Tracker) relayBeatLocked(hb bus.Heartbeat) {
	var d bus.RelayDetails
	if len(hb.Details) == 0 {
		return
	}
	if err := json.Unmarshal(hb.Details, &d); err != nil {
		t.log.Debug("ignoring bad relay heartbeat details", "err", err)
		return
	}
	if len(d.Database) > maxNameLen {
		d.Database = ""
	}
	d.LastError = clip(d.LastError)
	if d.LastErrorAt != nil && t.future(*d.LastErrorAt) {
		d.LastError, d.LastErrorAt = "", nil
	}
	t.relay.seen, t.relay.d = true, d
}

// gatewayRelayLocked keeps the gateway heartbeat's relay fields.
func (t *Tracker) gatewayRelayLocked(d bus.GatewayDetails) {
	t.relay.unacked = d.RelayUnacked
	if d.LastRelayErrorAt != nil && t.future(*d.LastRelayErrorAt) {
		return
	}
	t.relay.gwErr, t.relay.gwErrAt = clip(d.LastRelayError), d.LastRelayErrorAt
}

// Relay is relay as /status and /metrics see it.
type Relay struct {
	Seen    bool
	Details bus.RelayDetails
	// From the gateway's heartbeat.
	GatewayUnacked int64
	GatewayErr     string
	GatewayErrAt   *time.Time
	ServiceView    ServiceView
}

// Relay returns the relay view.
func (t *Tracker) Relay() Relay {
	sv := t.Service(bus.ServiceRelay)
	t.mu.RLock()
	defer t.mu.RUnlock()
	r := t.relay
	return Relay{Seen: r.seen, Details: r.d, GatewayUnacked: r.unacked, GatewayErr: r.gwErr, GatewayErrAt: r.gwErrAt,
		ServiceView: sv}
}

// relayReasons: while WhatsApp is connected, incoming messages wait for
// relay; without it (or with its database down) none is acknowledged.
func (t *Tracker) relayReasons(wa WhatsApp) []string {
	if wa.State != bus.StateConnected {
		return nil
	}
	r := t.Relay()
	switch sv := r.ServiceView; {
	case !sv.Seen:
		return []string{reasonRelayMissing + " (no heartbeat yet)"}
	case !sv.Fresh:
		return []string{fmt.Sprintf("%s (heartbeat stale: last one %s ago, limit %s)", reasonRelayMissing,
			sv.Age.Round(time.Second), t.staleAge)}
	case r.Seen && !r.Details.DatabaseOK:
		return []string{reasonRelayDB}
	}
	return nil
}

// RelayDoc is relay in /status. Without the token only the state.
type RelayDoc struct {
	State             string     `json:"state"`
	LastSeq           *int64     `json:"last_seq,omitempty"`
	Stored            *int64     `json:"stored,omitempty"`
	PendingDeliveries *int64     `json:"pending_deliveries,omitempty"`
	DeadDeliveries    *int64     `json:"dead_deliveries,omitempty"`
	OldestPendingMS   *int64     `json:"oldest_pending_ms,omitempty"`
	QueuedSends       *int64     `json:"queued_sends,omitempty"`
	JetStream         *bool      `json:"jetstream,omitempty"`
	Webhook           *bool      `json:"webhook,omitempty"`
	Database          string     `json:"database,omitempty"`
	DatabaseOK        *bool      `json:"database_ok,omitempty"`
	LastError         string     `json:"last_error,omitempty"`
	LastErrorAt       *time.Time `json:"last_error_at,omitempty"`
	// The gateway's side: hand-overs relay did not confirm since the
	// gateway started (left unacknowledged for WhatsApp to send again).
	GatewayUnacked     *int64     `json:"gateway_unacked,omitempty"`
	GatewayLastError   string     `json:"gateway_last_error,omitempty"`
	GatewayLastErrorAt *time.Time `json:"gateway_last_error_at,omitempty"`
}

// relayDoc builds /status's relay; state is the service's state as the
// services map shows it.
func (s *Service) relayDoc(state string, full bool) RelayDoc {
	doc := RelayDoc{State: state}
	if !full {
		return doc
	}
	r := s.tracker.Relay()
	doc.GatewayUnacked = &r.GatewayUnacked
	doc.GatewayLastError, doc.GatewayLastErrorAt = s.redact(r.GatewayErr), r.GatewayErrAt
	if !r.Seen {
		return doc
	}
	d := r.Details
	doc.LastSeq, doc.Stored = &d.LastSeq, &d.Stored
	doc.PendingDeliveries, doc.DeadDeliveries, doc.QueuedSends = &d.PendingDeliveries, &d.DeadDeliveries, &d.QueuedSends
	doc.OldestPendingMS = &d.OldestPendingMS
	doc.JetStream, doc.Webhook = &d.JetStream, &d.Webhook
	doc.Database, doc.DatabaseOK = s.redact(d.Database), &d.DatabaseOK
	doc.LastError, doc.LastErrorAt = s.redact(d.LastError), d.LastErrorAt
	return doc
}

var (
	descRelayDead = prometheus.NewDesc("blacksky_relay_dead_deliveries",
		"Deliveries relay gave up on (retries exhausted or refused): blacksky deliveries retry sends them again.", nil, nil)
	descRelayPending = prometheus.NewDesc("blacksky_relay_pending_deliveries",
		"Deliveries relay has not made yet (NATS, JetStream, webhook).", nil, nil)
	descRelayLastSeq = prometheus.NewDesc("blacksky_relay_last_seq",
		"The newest stored message's seq.", nil, nil)
	descRelayOldest = prometheus.NewDesc("blacksky_relay_oldest_pending_seconds",
		"Age of the oldest undelivered item.", nil, nil)
	descRelayQueued = prometheus.NewDesc("blacksky_relay_queued_sends",
		"Sends waiting for their SEND_RATE slot or for the gateway.", nil, nil)
	descRelayDB = prometheus.NewDesc("blacksky_relay_database_up",
		"1 when relay's database answers.", nil, nil)
	descGwUnacked = prometheus.NewDesc("blacksky_gateway_relay_unacked_total",
		"Incoming messages and receipts the gateway left unacknowledged because relay did not store them, since the gateway started.", nil, nil)
)

var relayDescs = []*prometheus.Desc{descRelayDead, descRelayPending, descRelayLastSeq, descRelayOldest, descRelayQueued, descRelayDB, descGwUnacked}

// collectRelay exports relay's gauges once its heartbeat has been heard,
// and the gateway's unacked count always.
func (c *trackerCollector) collectRelay(ch chan<- prometheus.Metric) {
	r := c.t.Relay()
	ch <- prometheus.MustNewConstMetric(descGwUnacked, prometheus.CounterValue, float64(r.GatewayUnacked))
	if !r.Seen {
		return
	}
	d := r.Details
	for _, m := range []struct {
		desc *prometheus.Desc
		v    float64
	}{
		{descRelayDead, float64(d.DeadDeliveries)},
		{descRelayPending, float64(d.PendingDeliveries)},
		{descRelayLastSeq, float64(d.LastSeq)},
		{descRelayOldest, float64(d.OldestPendingMS) / 1000},
		{descRelayQueued, float64(d.QueuedSends)},
		{descRelayDB, b2f(d.DatabaseOK)},
	} {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.GaugeValue, m.v)
	}
}
