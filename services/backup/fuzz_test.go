package backup_test

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// FuzzBackupRequest feeds arbitrary bodies of P.backup.request to the
// decoder the handler uses: it never panics, an accepted request names a
// valid reason, and accepting is stable under re-encoding.
func FuzzBackupRequest(f *testing.F) {
	for _, s := range []string{``, `{}`, `{"reason":"manual"}`, `{"reason":"restore-point"}`, `{bad`, `[]`, `null`,
		`{"reason":"x","y":1}`, `{"reason":"A"}`, `{"reason":"manual"} {}`, "{\"reason\":\"\\u0000\"}", ` {"reason":"a_b-1"} `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := bus.DecodeBackupRequest(body)
		if err != nil {
			// The handler answers {"ok":false,"error":...}: it must encode.
			out, merr := json.Marshal(bus.BackupReply{OK: false, Error: err.Error()})
			if merr != nil || len(out) == 0 {
				t.Fatalf("reply for %q does not encode: %v", body, merr)
			}
			return
		}
		if !slices.Contains(bus.RequestReasons(), req.Reason) {
			t.Fatalf("accepted reason %q, not one of %v", req.Reason, bus.RequestReasons())
		}
		again, err := bus.DecodeBackupRequest(mustJSON(req))
		if err != nil || again != req {
			t.Fatalf("re-encoded %+v decodes to %+v, %v", req, again, err)
		}
	})
}
