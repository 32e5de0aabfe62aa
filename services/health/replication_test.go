package health

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// holderReplication are the details of a lease holder replicating
// continuously, every field of issue 10 set.
func holderReplication(now time.Time) bus.BackupDetails {
	point, base, comp := now.Add(-800*time.Millisecond).UTC(), now.Add(-20*time.Minute).UTC(), now.Add(-time.Hour).UTC()
	return bus.BackupDetails{Database: "postgres", DatabaseOK: true, LeaseHeld: true, Generation: 7,
		ReplicationLagMS: 1250, Points: 312, StoredBytes: 3 << 20, LastPointAt: &point, LastBaseAt: &base,
		LastCompactionAt: &comp}
}

// /status shows continuous replication to a token holder only (the public
// document keeps the backup state alone), and /metrics exports its gauges.
func TestStatusAndMetricsShowReplication(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	d := holderReplication(b.clock.Now())
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, d)

	_, pub, _ := b.get(t, "/status", nil)
	if sd := decode[StatusDoc](t, pub); sd.Backup.Replication != nil || strings.Contains(pub, "replication_lag_ms") {
		t.Fatalf("public /status shows replication: %s", pub)
	}
	_, full, _ := b.get(t, "/status", bearer(testToken))
	r := decode[StatusDoc](t, full).Backup.Replication
	if r == nil || r.Generation != 7 || r.LagMS != 1250 || r.Points != 312 || r.StoredBytes != 3<<20 ||
		!r.LastPointAt.Equal(*d.LastPointAt) || !r.LastBaseAt.Equal(*d.LastBaseAt) || !r.LastCompactionAt.Equal(*d.LastCompactionAt) {
		t.Fatalf("full /status backup = %s", full)
	}

	_, metrics, _ := b.get(t, "/metrics", nil)
	for _, want := range []string{
		"blacksky_backup_replication_lag_seconds 1.25", "blacksky_backup_points 312",
		"blacksky_backup_stored_bytes 3.145728e+06", "blacksky_backup_generation 7",
		"blacksky_backup_last_point_timestamp_seconds ", "blacksky_backup_last_base_timestamp_seconds ",
		"blacksky_backup_last_compaction_timestamp_seconds ",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if got := metricValue(t, metrics, "blacksky_backup_last_base_timestamp_seconds"); got != float64(d.LastBaseAt.Unix()) {
		t.Errorf("last base timestamp = %v, want %d", got, d.LastBaseAt.Unix())
	}
}

// Before a lease holder reports a generation (an older backup, no lease
// yet, or no heartbeat at all) the gauges are absent, not a fake zero
// lag, and /status has no replication block.
func TestReplicationAbsentUntilAHolderReportsAGeneration(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t) // a holder without replication fields
	b.beat(t, bus.ServiceBackup, "web.2", bus.StateStandby, bus.BackupDetails{Database: "postgres", DatabaseOK: true,
		Generation: 3, LeaseHolder: "web.1"})
	_, metrics, _ := b.get(t, "/metrics", nil)
	if strings.Contains(metrics, "blacksky_backup_replication_lag_seconds") || strings.Contains(metrics, "blacksky_backup_generation") {
		t.Fatalf("/metrics shows replication nobody reported:\n%s", metrics)
	}
	_, full, _ := b.get(t, "/status", bearer(testToken))
	if r := decode[StatusDoc](t, full).Backup.Replication; r != nil {
		t.Fatalf("status replication = %+v, want none", r)
	}
}

// A standby's beat (it writes no point) and a holder's late beat, handled
// after a newer one, leave the newest holder figures in place; times from
// the future and negative figures a sender made up are not shown.
func TestReplicationKeepsTheNewestHolderBeat(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	d := holderReplication(b.clock.Now())
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, d)

	b.beat(t, bus.ServiceBackup, "web.2", bus.StateStandby, bus.BackupDetails{Database: "postgres", DatabaseOK: true})
	late := d
	late.ReplicationLagMS, late.Points = 99_000, 1
	b.sendBackupBeat(t, "web.1", b.clock.Now().Add(-2*time.Second), late)
	r := b.svc.tracker.Replication()
	if r.Lag != 1250*time.Millisecond || r.Points != 312 || r.Generation != 7 {
		t.Fatalf("after a standby's and a late beat: %+v, want the holder's newest", r)
	}

	future := b.clock.Now().Add(time.Hour)
	odd := d
	odd.Generation, odd.ReplicationLagMS, odd.Points, odd.StoredBytes = 8, -5, -1, -1
	odd.LastPointAt, odd.LastCompactionAt = &future, &future
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, odd)
	r = b.svc.tracker.Replication()
	if r.Generation != 8 || r.Lag != 0 || r.Points != 0 || r.StoredBytes != 0 || r.LastPointAt != nil ||
		r.LastCompactionAt != nil || r.LastBaseAt == nil {
		t.Fatalf("after an odd beat: %+v", r)
	}
}

// Through a database outage the lease lapses (no renewal for a TTL), but
// the instance that last held it keeps replicating into its local fallback
// and its growing lag stays shown; a standby's beat does not replace it,
// and once another instance takes the lease its figures win.
func TestReplicationLagKeepsGrowingThroughAnOutage(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	d := holderReplication(b.clock.Now())
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, d)

	out := d
	out.DatabaseOK, out.LeaseHeld, out.ReplicationLagMS = false, false, 53_000
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateDegraded, out)
	if r := b.svc.tracker.Replication(); r.Lag != 53*time.Second || r.Generation != 7 {
		t.Fatalf("during the outage: %+v, want the last holder's 53 s", r)
	}
	_, metrics, _ := b.get(t, "/metrics", nil)
	if got := metricValue(t, metrics, "blacksky_backup_replication_lag_seconds"); got != 53 {
		t.Fatalf("/metrics lag = %v during the outage, want 53", got)
	}
	_, full, _ := b.get(t, "/status", bearer(testToken))
	if r := decode[StatusDoc](t, full).Backup.Replication; r == nil || r.LagMS != 53_000 {
		t.Fatalf("/status replication during the outage = %+v", r)
	}

	b.beat(t, bus.ServiceBackup, "web.2", bus.StateStandby, bus.BackupDetails{Database: "postgres", Generation: 7})
	if r := b.svc.tracker.Replication(); r.Lag != 53*time.Second {
		t.Fatalf("a standby's beat replaced the last holder's: %+v", r)
	}

	took := holderReplication(b.clock.Now())
	took.Generation, took.ReplicationLagMS = 8, 300
	b.beat(t, bus.ServiceBackup, "web.2", bus.StateOK, took)
	out.ReplicationLagMS = 90_000
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateDegraded, out)
	if r := b.svc.tracker.Replication(); r.Generation != 8 || r.Lag != 300*time.Millisecond {
		t.Fatalf("after web.2 took the lease: %+v, want its figures", r)
	}
}

// The largest backup heartbeat the service can send (every replication
// field, a clipped error, a long lease holder name) passes health's
// decoding bounds.
func TestLargestBackupHeartbeatIsAccepted(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	d := holderReplication(b.clock.Now())
	at := b.clock.Now().UTC()
	d.LastSnapshotID, d.LastSnapshotAt, d.LastSnapshotBytes = 1<<62, &at, 1<<62
	d.LastError, d.LastErrorAt = strings.Repeat("é", maxTextLen), &at
	d.LeaseHolder, d.LeaseWatchMS = strings.Repeat("h", maxNameLen), 1<<62
	d.Generation, d.Points, d.StoredBytes, d.ReplicationLagMS = 1<<62, 1<<62, 1<<62, 1<<62
	hb := bus.Heartbeat{Service: bus.ServiceBackup, Instance: strings.Repeat("i", maxNameLen), State: bus.StateDegraded}
	hb.Details, _ = json.Marshal(d)
	hb.Stamp(b.opts.Session, b.clock.Now())
	if _, why := b.svc.tracker.decodeHeartbeat([]byte(mustJSON(t, hb))); why != "" {
		t.Fatalf("largest backup heartbeat refused: %s", why)
	}
	b.send(t, b.subj.Heartbeat(bus.ServiceBackup), "heartbeat.backup", hb)
	if r := b.svc.tracker.Replication(); r.Generation != 1<<62 {
		t.Fatalf("replication = %+v", r)
	}
}

// sendBackupBeat publishes a backup heartbeat stamped at at.
func (b *bundle) sendBackupBeat(t *testing.T, instance string, at time.Time, d bus.BackupDetails) {
	t.Helper()
	hb := bus.Heartbeat{Service: bus.ServiceBackup, Instance: instance, State: bus.StateOK}
	hb.Details = json.RawMessage(mustJSON(t, d))
	hb.Stamp(b.opts.Session, at)
	b.send(t, b.subj.Heartbeat(bus.ServiceBackup), "heartbeat.backup", hb)
}

// metricValue is the value of an unlabelled metric in a /metrics body.
func metricValue(t *testing.T, body, name string) float64 {
	t.Helper()
	for line := range strings.Lines(body) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("/metrics lacks %s", name)
	return 0
}
