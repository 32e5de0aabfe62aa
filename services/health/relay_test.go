package health

import (
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// While WhatsApp is connected, incoming messages wait for relay: /readyz
// fails, saying why, when relay's heartbeat is missing or stale or its
// database is down, and not while WhatsApp is not connected.
func TestReadyzNeedsRelayWhileConnected(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	since := b.clock.Now().Add(-time.Hour).UTC()
	b.beat(t, bus.ServiceGateway, "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, bus.BackupDetails{Database: "postgres", DatabaseOK: true, LeaseHeld: true})
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("pairing without relay: %d %s, want 200 (nothing to acknowledge)", code, body)
	}

	b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{WAState: bus.StateConnected, ConnectedSince: &since})
	code, body, _ := b.get(t, "/readyz", nil)
	doc := decode[readyDoc](t, body)
	if code != 503 || len(doc.Reasons) != 1 || !hasReason(doc.Reasons, reasonRelayMissing+" (no heartbeat yet)") {
		t.Fatalf("connected without relay: %d %s", code, body)
	}

	b.relayBeat(t, relayOK())
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("with relay: %d %s", code, body)
	}

	down := relayOK()
	down.DatabaseOK = false
	b.relayBeat(t, down)
	if code, body, _ := b.get(t, "/readyz", nil); code != 503 || !strings.Contains(body, reasonRelayDB) {
		t.Fatalf("relay's database down: %d %s", code, body)
	}

	// Relay stops beating while the gateway goes on.
	b.relayBeat(t, relayOK())
	for range 4 {
		b.advance(t, bus.HeartbeatInterval)
		b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{WAState: bus.StateConnected, ConnectedSince: &since})
		b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, bus.BackupDetails{Database: "postgres", DatabaseOK: true, LeaseHeld: true})
	}
	code, body, _ = b.get(t, "/readyz", nil)
	doc = decode[readyDoc](t, body)
	if code != 503 || len(doc.Reasons) != 1 || !hasReason(doc.Reasons, reasonRelayMissing+" (heartbeat stale: last one 20s ago") {
		t.Fatalf("relay stale: %d %s", code, body)
	}
	_, st, _ := b.get(t, "/status", nil)
	if sd := decode[StatusDoc](t, st); sd.Relay.State != StateStale || !sd.Services["relay"].Required {
		t.Fatalf("status relay = %+v, service %+v", sd.Relay, sd.Services["relay"])
	}
}

// /status shows relay's figures and the gateway's unacked count to a token
// holder (only the state to others); /metrics exports them.
func TestStatusAndMetricsShowRelay(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	errAt := b.clock.Now().Add(-time.Minute).UTC()
	b.relayBeat(t, bus.RelayDetails{Database: "postgres", DatabaseOK: true, LastSeq: 1234, Stored: 1200,
		PendingDeliveries: 5, DeadDeliveries: 2, QueuedSends: 3, JetStream: true, Webhook: true, OldestPendingMS: 7500,
		LastError: "webhook: 500 from https://hooks.example/in", LastErrorAt: &errAt})
	since := b.clock.Now().Add(-time.Hour).UTC()
	b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{WAState: bus.StateConnected,
		ConnectedSince: &since, RelayUnacked: 7, LastRelayError: "relay not running (no responder on relay.store)", LastRelayErrorAt: &errAt})

	_, pub, _ := b.get(t, "/status", nil)
	if sd := decode[StatusDoc](t, pub); sd.Relay.State != bus.StateOK || sd.Relay.LastSeq != nil || sd.Relay.GatewayUnacked != nil ||
		sd.Relay.LastError != "" {
		t.Fatalf("public relay = %+v, want the state only", sd.Relay)
	}
	_, full, _ := b.get(t, "/status", bearer(testToken))
	r := decode[StatusDoc](t, full).Relay
	if r.State != bus.StateOK || *r.LastSeq != 1234 || *r.Stored != 1200 || *r.PendingDeliveries != 5 || *r.DeadDeliveries != 2 ||
		*r.QueuedSends != 3 || !*r.JetStream || !*r.Webhook || *r.OldestPendingMS != 7500 || r.Database != "postgres" ||
		!*r.DatabaseOK || !strings.HasPrefix(r.LastError, "webhook: 500") || *r.GatewayUnacked != 7 ||
		!strings.Contains(r.GatewayLastError, "no responder") || !r.GatewayLastErrorAt.Equal(errAt) {
		t.Fatalf("full relay = %s", full)
	}

	_, metrics, _ := b.get(t, "/metrics", nil)
	for _, want := range []string{
		"blacksky_relay_dead_deliveries 2", "blacksky_relay_pending_deliveries 5", "blacksky_relay_last_seq 1234",
		"blacksky_relay_oldest_pending_seconds 7.5", "blacksky_relay_queued_sends 3", "blacksky_relay_database_up 1",
		"blacksky_gateway_relay_unacked_total 7", `blacksky_service_up{service="relay"} 1`,
	} {
		if !strings.Contains(metrics, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// Before relay's first heartbeat its gauges are absent (not a fake zero),
// and /status shows it missing.
func TestRelayGaugesAbsentBeforeItsHeartbeat(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	_, metrics, _ := b.get(t, "/metrics", nil)
	if strings.Contains(metrics, "blacksky_relay_last_seq") || !strings.Contains(metrics, "blacksky_gateway_relay_unacked_total 0\n") ||
		!strings.Contains(metrics, `blacksky_service_up{service="relay"} 0`) {
		t.Fatalf("/metrics before relay beats:\n%s", metrics)
	}
	_, st, _ := b.get(t, "/status", bearer(testToken))
	if sd := decode[StatusDoc](t, st); sd.Relay.State != StateMissing || sd.Relay.LastSeq != nil || sd.Services["relay"].State != StateMissing {
		t.Fatalf("status relay = %+v", sd.Relay)
	}
}
