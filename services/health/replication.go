package health

import (
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/prometheus/client_golang/prometheus"
)

// replicationState is continuous replication as the lease holder's backup
// heartbeat last told it (issue 10). Only the holder's beats count: a
// standby writes no point, and its zeros must not hide the holder's lag.
// The instance that last held the lease keeps counting after its lease
// lapses (a database outage): its lag is the one that grows, and freezing
// the last figure would show a healthy lag through the outage.
type replicationState struct {
	seen     bool
	instance string // the instance whose beats count
	// srcAt is the sender's time of the beat kept: a holder's late beat,
	// handled after a newer one, must not undo it.
	srcAt            time.Time
	generation       int64
	lagMS            int64
	points           int64
	storedBytes      int64
	lastPointAt      *time.Time
	lastBaseAt       *time.Time
	lastCompactionAt *time.Time
}

// replicationBeatLocked keeps the replication fields of a lease holder's
// beat, or of the instance that last held it while its lease lapsed (under
// a generation no older than the one shown). A generation is what every
// point is written under: without one the beat says nothing about
// replication (an older backup, or no lease yet).
func (t *Tracker) replicationBeatLocked(hb bus.Heartbeat, d bus.BackupDetails) {
	cur := t.replication
	if d.Generation <= 0 || hb.At.Before(cur.srcAt) {
		return
	}
	lastHolder := cur.seen && hb.Instance == cur.instance && d.Generation >= cur.generation
	if !d.LeaseHeld && !lastHolder {
		return
	}
	// A time ahead of our clock would show a point that does not exist yet;
	// negative figures are nonsense a sender made up.
	at := func(p *time.Time) *time.Time {
		if p == nil || t.future(*p) {
			return nil
		}
		v := p.UTC()
		return &v
	}
	t.replication = replicationState{
		seen: true, instance: hb.Instance, srcAt: hb.At, generation: d.Generation,
		lagMS: max(d.ReplicationLagMS, 0), points: max(d.Points, 0), storedBytes: max(d.StoredBytes, 0),
		lastPointAt: at(d.LastPointAt), lastBaseAt: at(d.LastBaseAt), lastCompactionAt: at(d.LastCompactionAt),
	}
}

// Replication is continuous replication as /status and /metrics see it.
type Replication struct {
	Seen             bool
	Generation       int64
	Lag              time.Duration // as of the holder's last heartbeat
	Points           int64
	StoredBytes      int64
	LastPointAt      *time.Time
	LastBaseAt       *time.Time
	LastCompactionAt *time.Time
}

// Replication returns the replication view.
func (t *Tracker) Replication() Replication {
	t.mu.RLock()
	defer t.mu.RUnlock()
	r := t.replication
	return Replication{Seen: r.seen, Generation: r.generation, Lag: time.Duration(r.lagMS) * time.Millisecond,
		Points: r.points, StoredBytes: r.storedBytes, LastPointAt: r.lastPointAt, LastBaseAt: r.lastBaseAt,
		LastCompactionAt: r.lastCompactionAt}
}

// ReplicationDoc is continuous replication in /status (token only), once
// the lease holder's heartbeat reported a generation.
type ReplicationDoc struct {
	Generation       int64      `json:"generation"`
	LagMS            int64      `json:"replication_lag_ms"`
	Points           int64      `json:"points"`
	StoredBytes      int64      `json:"stored_bytes"`
	LastPointAt      *time.Time `json:"last_point_at,omitempty"`
	LastBaseAt       *time.Time `json:"last_base_at,omitempty"`
	LastCompactionAt *time.Time `json:"last_compaction_at,omitempty"`
}

func (s *Service) replicationDoc() *ReplicationDoc {
	r := s.tracker.Replication()
	if !r.Seen {
		return nil
	}
	return &ReplicationDoc{Generation: r.Generation, LagMS: r.Lag.Milliseconds(), Points: r.Points,
		StoredBytes: r.StoredBytes, LastPointAt: r.LastPointAt, LastBaseAt: r.LastBaseAt, LastCompactionAt: r.LastCompactionAt}
}

var (
	descReplLag = prometheus.NewDesc("blacksky_backup_replication_lag_seconds",
		"Age of the oldest committed write to the session store not yet in a stored point, as of backup's last heartbeat (0: nothing waiting).", nil, nil)
	descReplPoints = prometheus.NewDesc("blacksky_backup_points",
		"Points (bases and deltas) stored for this session.", nil, nil)
	descReplStored = prometheus.NewDesc("blacksky_backup_stored_bytes",
		"Bytes stored for this session's points (manifests and pieces, compressed and encrypted).", nil, nil)
	descReplGeneration = prometheus.NewDesc("blacksky_backup_generation",
		"Lease generation the holder writes points under.", nil, nil)
	descReplLastPoint = prometheus.NewDesc("blacksky_backup_last_point_timestamp_seconds",
		"Unix time of the newest stored point.", nil, nil)
	descReplLastBase = prometheus.NewDesc("blacksky_backup_last_base_timestamp_seconds",
		"Unix time of the newest stored base (full) point.", nil, nil)
	descReplLastCompaction = prometheus.NewDesc("blacksky_backup_last_compaction_timestamp_seconds",
		"Unix time of the last compaction.", nil, nil)
)

var replicationDescs = []*prometheus.Desc{descReplLag, descReplPoints, descReplStored, descReplGeneration,
	descReplLastPoint, descReplLastBase, descReplLastCompaction}

// collectReplication exports the gauges once a holder's beat reported a
// generation (absent before, not a fake zero); the timestamps once known.
func (c *trackerCollector) collectReplication(ch chan<- prometheus.Metric) {
	r := c.t.Replication()
	if !r.Seen {
		return
	}
	ch <- prometheus.MustNewConstMetric(descReplLag, prometheus.GaugeValue, r.Lag.Seconds())
	ch <- prometheus.MustNewConstMetric(descReplPoints, prometheus.GaugeValue, float64(r.Points))
	ch <- prometheus.MustNewConstMetric(descReplStored, prometheus.GaugeValue, float64(r.StoredBytes))
	ch <- prometheus.MustNewConstMetric(descReplGeneration, prometheus.GaugeValue, float64(r.Generation))
	for _, ts := range []struct {
		desc *prometheus.Desc
		at   *time.Time
	}{{descReplLastPoint, r.LastPointAt}, {descReplLastBase, r.LastBaseAt}, {descReplLastCompaction, r.LastCompactionAt}} {
		if ts.at != nil {
			ch <- prometheus.MustNewConstMetric(ts.desc, prometheus.GaugeValue, float64(ts.at.UnixMilli())/1000)
		}
	}
}
