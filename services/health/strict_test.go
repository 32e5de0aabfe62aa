package health

import (
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// Only well-formed events move health: a reply a bot steered onto an event
// subject ({"ok": true, ...}), an event without a time, with a kind other
// than its subject's or with fields no event has changes nothing.
func TestMalformedEventsChangeNothing(t *testing.T) {
	t.Parallel()
	tr := NewTracker(clockwork.NewFakeClockAt(time.Date(2026, 1, 1, 0, 0, 1, 0, time.UTC)), 0, logging.Discard())
	for _, tc := range []struct{ kind, body string }{
		{bus.ConnConnected, `{"ok":true}`},
		{bus.ConnConnected, `{"ok":false,"error":"bad JSON: unexpected end of JSON input"}`},
		{bus.ConnConnected, `{"session":"s","kind":"connected"}`},                                   // no time
		{bus.ConnConnected, `{"session":"s","at":"2026-01-01T00:00:00Z"}`},                          // no kind
		{bus.ConnConnected, `{"session":"s","at":"2026-01-01T00:00:00Z","kind":"qr","code":"2@x"}`}, // another kind
		{bus.ConnQR, `{"session":"s","at":"2026-01-01T00:00:00Z","kind":"qr","code":"2@x","ok":true}`},
		{bus.ConnQR, ``},
	} {
		tr.HandleConn(tc.kind, []byte(tc.body))
		if wa := tr.WhatsApp(); wa.State != StateUnknown || wa.QR != "" {
			t.Fatalf("conn.%s %s changed the state: %+v", tc.kind, tc.body, wa)
		}
	}
	for _, body := range []string{
		`{"ok":true,"job_id":9,"snapshot":{"id":99,"bytes":1,"sha256":"x","unchanged":false}}`,
		`{"session":"s","snapshot_id":99,"reason":"manual"}`, // no time
		`{"session":"s","at":"2026-01-01T00:00:00Z","snapshot_id":99,"reason":"manual","ok":true}`,
	} {
		tr.HandleBackupDone([]byte(body))
		tr.HandleBackupFailed([]byte(body))
		if b := tr.Backup(); b.LastID != 0 || b.LastAt != nil || b.LastErr != "" || b.LastErrAt != nil {
			t.Fatalf("backup event %s was recorded: %+v", body, b)
		}
	}
	// The well-formed ones still count.
	tr.HandleConn(bus.ConnConnected, []byte(`{"session":"s","at":"2026-01-01T00:00:00Z","kind":"connected"}`))
	tr.HandleBackupDone([]byte(`{"session":"s","at":"2026-01-01T00:00:00Z","snapshot_id":7,"reason":"manual"}`))
	if wa, b := tr.WhatsApp(), tr.Backup(); wa.State != bus.StateConnected || b.LastID != 7 {
		t.Fatalf("well-formed events: state %s, snapshot %d", wa.State, b.LastID)
	}
}
