package gateway

import (
	"strings"
	"testing"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// Logs leave the process (log drains): in production a pairing code never
// reaches them, and JIDs are masked as /status masks them.
func TestLogsHoldNoPairingCodeInProductionAndMaskJIDs(t *testing.T) {
	for _, production := range []bool{true, false} {
		name := map[bool]string{true: "production", false: "development"}[production]
		t.Run(name, func(t *testing.T) {
			h := start(t, func(c *Config, f *fakeConn) {
				c.PairPhone = "15551234567"
				c.Production = production
				f.pairCode = "ABCD-EFGH"
			})
			h.rec.next(t, bus.ConnConnecting)
			h.conn.emit(&events.QR{Codes: []string{"code-a"}})
			h.rec.next(t, bus.ConnQR)
			if pc := h.rec.next(t, bus.ConnPairCode); pc.Code != "ABCD-EFGH" {
				t.Fatalf("pair_code = %+v; the bus (and /pair) still gets it", pc)
			}
			jid := types.NewJID("15559998888", types.DefaultUserServer)
			h.conn.mu.Lock()
			h.conn.jid = jid
			h.conn.mu.Unlock()
			h.conn.emit(&events.PairSuccess{ID: jid, Platform: "android"})
			h.rec.next(t, bus.ConnPaired)
			h.conn.emit(&events.Connected{})
			h.rec.next(t, bus.ConnConnected)
			h.probe()
			logs := h.logs.String()
			if got := strings.Contains(logs, "ABCD-EFGH"); got == production {
				t.Errorf("pairing code in the log = %v in %s:\n%s", got, name, logs)
			}
			if strings.Contains(logs, "15559998888") || !strings.Contains(logs, "1555****888") {
				t.Errorf("the log shows the JID unmasked (or not at all):\n%s", logs)
			}
		})
	}
}
