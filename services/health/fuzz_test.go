package health

import (
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/jonboulle/clockwork"
)

// FuzzTrackerInput feeds arbitrary bus payloads to every handler: whatever
// arrives on the bus, the tracker must not panic, and readiness, the views
// and the JID mask must still answer.
func FuzzTrackerInput(f *testing.F) {
	f.Add(uint8(0), "gateway", []byte(`{"service":"gateway","instance":"a","state":"standby","details":{"wa_state":"standby"}}`))
	f.Add(uint8(1), "qr", []byte(`{"kind":"qr","code":"2@x","expires_at":"2026-11-26T12:00:00Z"}`))
	f.Add(uint8(1), "paired", []byte(`{"kind":"paired","jid":"1:2@s.whatsapp.net"}`))
	f.Add(uint8(2), "", []byte(`{"snapshot_id":1,"reason":"manual","bytes":-5,"duration_ms":-1}`))
	f.Add(uint8(3), "", []byte(`{"reason":"x","error":"e","attempt":1}`))
	f.Add(uint8(0), "", []byte(`{"service":"backup","details":"not an object"}`))
	f.Add(uint8(1), "connected", []byte(`null`))
	f.Add(uint8(0), "", []byte(`{"service":"relay","instance":"a","state":"ok","details":{"database":"postgres","database_ok":true,"last_seq":-3,"last_error":"x","last_error_at":"2999-01-01T00:00:00Z"}}`))
	f.Add(uint8(0), "", []byte(`{"service":"gateway","instance":"a","state":"connected","details":{"wa_state":"connected","relay_unacked":-1,"last_relay_error":"e"}}`))
	f.Add(uint8(0), "", []byte(`{"service":"backup","instance":"a","state":"ok","at":"2026-11-26T12:00:00Z","details":{"lease_held":true,"generation":3,"replication_lag_ms":-7,"points":9,"stored_bytes":-1,"last_point_at":"2999-01-01T00:00:00Z","last_base_at":"2026-11-26T11:00:00Z","last_compaction_at":"not a time"}}`))
	f.Add(uint8(0), "", []byte(`{"service":"backup","instance":"a","state":"ok","details":{"lease_held":true,"generation":9223372036854775807,"replication_lag_ms":9223372036854775807,"points":1,"stored_bytes":1,"last_point_at":"0001-01-01T00:00:00Z"}}`))
	f.Fuzz(func(t *testing.T, which uint8, kind string, data []byte) {
		clock := clockwork.NewFakeClock()
		tr := NewTracker(clock, 0, logging.Discard())
		tr.metrics = newMetrics(tr, Requirements{Heartbeats: true, Services: []string{bus.ServiceGateway}})
		for range 2 {
			switch which % 4 {
			case 0:
				tr.HandleHeartbeat(data)
			case 1:
				tr.HandleConn(kind, data)
			case 2:
				tr.HandleBackupDone(data)
			case 3:
				tr.HandleBackupFailed(data)
			}
			clock.Advance(20 * time.Second)
		}
		tr.Ready(Requirements{Heartbeats: true, Services: []string{bus.ServiceGateway, bus.ServiceBackup}})
		wa := tr.WhatsApp()
		_ = MaskJID(wa.JID)
		tr.Backup()
		tr.Relay()
		tr.Replication()
		if _, err := tr.metrics.reg.Gather(); err != nil {
			t.Fatalf("metrics gather: %v", err)
		}
	})
}
