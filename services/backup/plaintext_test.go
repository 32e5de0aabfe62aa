package backup_test

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// A plaintext file planted in the fallback folder while a key is set is
// refused from its header: its body is never inflated, so a small file that
// expands to a large one costs nothing at every start.
func TestPlantedPlaintextSnapshotIsRefusedBeforeDecoding(t *testing.T) {
	zeros := make([]byte, 64<<20)
	payload, _, err := snapshot.Encode(zeros, nil)
	if err != nil {
		t.Fatal(err)
	}
	zeros = nil
	if len(payload) > 1<<20 {
		t.Fatalf("planted file is %d bytes; expected a small one", len(payload))
	}
	to := t.TempDir()
	l := backup.Local{Dir: to + "/backups"}
	if _, err := l.Write(payload, time.Now(), "manual", strings.Repeat("0", 64)); err != nil {
		t.Fatal(err)
	}
	r := &backup.Restorer{Session: session, SessionPath: to + "/session.db", Local: l, TmpDir: to,
		Key: []byte(strings.Repeat("k", 32)), Log: discard()}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	res, err := r.Restore(context.Background(), 0)
	runtime.ReadMemStats(&after)
	if err != nil || res.Restored {
		t.Fatalf("restore = %+v, %v; want the plaintext snapshot skipped", res, err)
	}
	if d := after.TotalAlloc - before.TotalAlloc; d > 16<<20 {
		t.Fatalf("refusing a %d-byte plaintext file allocated %d MB: it was decoded first", len(payload), d>>20)
	}
}
