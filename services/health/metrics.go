package health

import (
	"net/http"
	"slices"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// waStates are the WhatsApp states the state gauge always exports (0 or 1),
// so an alert on connected == 0 works before the first change.
var waStates = []string{
	StateUnknown, bus.StateStarting, bus.StateWaitingRestore, bus.StateStandby, bus.StateConnecting,
	bus.StateConnected, bus.StatePairing, bus.StateReconnecting, StateDisconnected, bus.StateLoggedOut,
	bus.StateStreamReplaced, bus.StateBanned, bus.StateOutdated, bus.StateStopped,
}

var knownServices = []string{bus.ServiceGateway, bus.ServiceBackup, bus.ServiceHealth, bus.ServiceRelay}

// metrics is our own registry: nothing registered globally, so tests and a
// second service in one process never collide.
type metrics struct {
	reg        *prometheus.Registry
	connEvents *prometheus.CounterVec
	reconnects prometheus.Counter
	snapshots  *prometheus.CounterVec
	duration   prometheus.Histogram
	size       prometheus.Histogram
	stored     prometheus.Histogram
	keepAwake  *prometheus.CounterVec
	requests   *prometheus.CounterVec
}

func newMetrics(t *Tracker, req Requirements) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		connEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blacksky_whatsapp_conn_events_total",
			Help: "WhatsApp connection events seen on the bus, by kind.",
		}, []string{"kind"}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "blacksky_whatsapp_reconnects_total",
			Help: "WhatsApp reconnect attempts seen since this health service started.",
		}),
		snapshots: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blacksky_snapshots_total",
			Help: "Session snapshots by reason and result (stored, unchanged, failed).",
		}, []string{"reason", "result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "blacksky_snapshot_duration_seconds",
			Help:    "Time to take and store one snapshot.",
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}),
		size: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "blacksky_snapshot_bytes",
			Help:    "Size of the plain session store in a snapshot.",
			Buckets: prometheus.ExponentialBuckets(64<<10, 4, 9), // 64 KiB .. 4 GiB
		}),
		stored: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "blacksky_snapshot_stored_bytes",
			Help:    "Size of a snapshot as stored (compressed, encrypted).",
			Buckets: prometheus.ExponentialBuckets(64<<10, 4, 9),
		}),
		keepAwake: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blacksky_keepawake_pings_total",
			Help: "Keep-awake requests to HEROKU_APP_URL/healthz, by result.",
		}, []string{"result"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blacksky_http_requests_total",
			Help: "Requests to the health service, by route and status code.",
		}, []string{"route", "code"}),
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.connEvents, m.reconnects, m.snapshots, m.duration, m.size, m.stored, m.keepAwake, m.requests,
		&trackerCollector{t: t, req: req},
	)
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

func (m *metrics) connEvent(kind string) {
	if !slices.Contains(bus.ConnKinds, kind) {
		kind = "other" // bounded label values whatever arrives on the bus
	}
	m.connEvents.WithLabelValues(kind).Inc()
	if kind == bus.ConnReconnecting {
		m.reconnects.Inc()
	}
}

func (m *metrics) backupDone(ev bus.BackupDone) {
	result := "stored"
	if ev.Unchanged {
		result = "unchanged"
	}
	m.snapshots.WithLabelValues(reasonLabel(ev.Reason), result).Inc()
	m.duration.Observe(time.Duration(ev.DurationMS * int64(time.Millisecond)).Seconds())
	if ev.Bytes > 0 {
		m.size.Observe(float64(ev.Bytes))
	}
	if ev.StoredBytes > 0 && !ev.Unchanged {
		m.stored.Observe(float64(ev.StoredBytes))
	}
}

func (m *metrics) backupFailed(ev bus.BackupFailed) {
	m.snapshots.WithLabelValues(reasonLabel(ev.Reason), "failed").Inc()
}

// reasonLabel keeps the label set bounded and free of anything a sender
// put on the bus: only the contract's reasons pass.
func reasonLabel(r string) string {
	switch r {
	case bus.ReasonManual, bus.ReasonScheduled, bus.ReasonShutdown, bus.ReasonPaired, bus.ReasonRestorePoint:
		return r
	}
	return "other"
}

// trackerCollector reads the tracker at scrape time: heartbeat ages grow
// between beats, so they cannot be pushed when a beat arrives.
type trackerCollector struct {
	t   *Tracker
	req Requirements
}

var (
	descAge = prometheus.NewDesc("blacksky_heartbeat_age_seconds",
		"Seconds since the last heartbeat of a service.", []string{"service"}, nil)
	descUp = prometheus.NewDesc("blacksky_service_up",
		"1 when the service's heartbeat is fresh (under 3 intervals old).", []string{"service"}, nil)
	descState = prometheus.NewDesc("blacksky_whatsapp_state",
		"1 for the current WhatsApp connection state, 0 for the others.", []string{"state"}, nil)
	descConnected = prometheus.NewDesc("blacksky_whatsapp_connected",
		"1 while WhatsApp is connected.", nil, nil)
	descGwReconnects = prometheus.NewDesc("blacksky_whatsapp_gateway_reconnects",
		"Reconnects counted by the gateway since it started (from its heartbeat).", nil, nil)
	descReady = prometheus.NewDesc("blacksky_ready",
		"1 when /readyz answers 200.", nil, nil)
	descLastSnap = prometheus.NewDesc("blacksky_last_snapshot_timestamp_seconds",
		"Unix time of the newest snapshot heard of.", nil, nil)
)

func (c *trackerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descAge, descUp, descState, descConnected, descGwReconnects, descReady, descLastSnap} {
		ch <- d
	}
	for _, d := range slices.Concat(relayDescs, replicationDescs) {
		ch <- d
	}
}

func (c *trackerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.t.Services(slices.Concat(c.req.Services, []string{bus.ServiceRelay})...) {
		if !slices.Contains(knownServices, s.Name) {
			continue // label values come only from our own list
		}
		if s.Seen {
			ch <- prometheus.MustNewConstMetric(descAge, prometheus.GaugeValue, s.Age.Seconds(), s.Name)
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, b2f(s.Fresh), s.Name)
	}
	wa := c.t.WhatsApp()
	known := false
	for _, st := range waStates {
		known = known || st == wa.State
		ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, b2f(st == wa.State), st)
	}
	if !known {
		ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, 1, "other")
	}
	ch <- prometheus.MustNewConstMetric(descConnected, prometheus.GaugeValue, b2f(wa.State == bus.StateConnected))
	ch <- prometheus.MustNewConstMetric(descGwReconnects, prometheus.GaugeValue, float64(c.t.gatewayReconnects()))
	ready, _ := c.t.Ready(c.req)
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, b2f(ready))
	if b := c.t.Backup(); b.LastAt != nil {
		ch <- prometheus.MustNewConstMetric(descLastSnap, prometheus.GaugeValue, float64(b.LastAt.Unix()))
	}
	c.collectRelay(ch)
	c.collectReplication(ch)
}

func (t *Tracker) gatewayReconnects() int64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.wa.reconnects
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
