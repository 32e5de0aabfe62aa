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
		if _, err := tr.metrics.reg.Gather(); err != nil {
			t.Fatalf("metrics gather: %v", err)
		}
	})
}
