package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// With continuous replication on, backup-now answers with a point,
// snapshots lists points (kind, generation) beside full snapshots, and
// restore --id pN and --at TIME write that point back on a fresh disk.
func TestPointCommands(t *testing.T) {
	db := testdb.Postgres(t)
	const token = "point-cmd-test-token"
	const secret = "point-cmd-internal-secret"
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: token, InternalSecret: secret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	envFor := func(dataDir string) map[string]string {
		return map[string]string{
			"SESSION_ID": "Point Test", "DATA_DIR": dataDir, "DATABASE_URL": db.URL, "NATS_URL": srv.ClientURL(),
			"NATS_TOKEN": token, "NATS_INTERNAL_SECRET": secret, "SHUTDOWN_TIMEOUT": "20s", "LOG_LEVEL": "warn",
			"SYNC_INTERVAL": "200ms",
		}
	}
	ctx := context.Background()
	first := t.TempDir()
	path := filepath.Join(first, "session.db")
	if err := wastore.Create(ctx, path, 256<<10); err != nil {
		t.Fatal(err)
	}
	_, _, stop := runRole(t, envFor(first), "backup")
	var out, errOut string
	var code int
	testwait.For(t, 20*time.Second, "backup-now to succeed", func() bool {
		code, out, errOut = runMain(t, ctx, envFor(first), "backup-now", "--timeout", "20s")
		if code != 0 && !strings.Contains(errOut, "no backup service") {
			t.Fatalf("backup-now: exit %d, %q", code, errOut)
		}
		return code == 0
	})
	var rep bus.BackupReply
	if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.OK || rep.Snapshot == nil || rep.Snapshot.ID == 0 {
		t.Fatalf("backup-now printed %q (%v)", out, err)
	}
	w, err := wastore.StartWriter(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "writes", func() bool { return w.Last() >= 5 })
	last, err := w.Stop()
	if err != nil {
		t.Fatal(err)
	}
	// The writes reach the database as a delta by themselves.
	id := "p" + strconv.FormatInt(rep.Snapshot.ID, 10)
	testwait.For(t, 20*time.Second, "a delta listed", func() bool {
		code, out, errOut = runMain(t, ctx, envFor(first), "snapshots")
		return code == 0 && strings.Contains(out, "delta")
	})
	if !strings.Contains(out, id) || !strings.Contains(out, "base") || !strings.Contains(out, "GEN") {
		t.Fatalf("snapshots:\n%s\n%s", out, errOut)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	check := func(dir string, wantMax int64) {
		t.Helper()
		p := filepath.Join(dir, "session.db")
		if has, err := snapshot.HasDevice(ctx, p); err != nil || !has {
			t.Fatalf("restored store: device %v, %v", has, err)
		}
		if wantMax == 0 {
			return // before the writer made its table
		}
		if _, maxN, err := wastore.Writes(ctx, p); err != nil || maxN != wantMax {
			t.Fatalf("restored writes up to %d (%v); want %d", maxN, err, wantMax)
		}
	}
	// The point backup-now answered with: before the writes.
	second := t.TempDir()
	code, out, errOut = runMain(t, ctx, envFor(second), "restore", "--id", id)
	if code != 0 || !strings.Contains(out, `"restored":true`) {
		t.Fatalf("restore --id %s: exit %d, %q, %q", id, code, out, errOut)
	}
	check(second, 0)
	// Now: every write.
	third := t.TempDir()
	code, out, errOut = runMain(t, ctx, envFor(third), "restore", "--at", time.Now().UTC().Format(time.RFC3339Nano))
	if code != 0 || !strings.Contains(out, `"restored":true`) {
		t.Fatalf("restore --at now: exit %d, %q, %q", code, out, errOut)
	}
	check(third, last)
}
