package main

import (
	"context"
	"encoding/json"
	"os"
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

func TestMigrateIsIdempotent(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  func(t *testing.T) map[string]string
	}{
		{"sqlite", func(t *testing.T) map[string]string { return map[string]string{"DATA_DIR": t.TempDir()} }},
		{"postgres", func(t *testing.T) map[string]string {
			return map[string]string{"DATA_DIR": t.TempDir(), "DATABASE_URL": testdb.Postgres(t).URL}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := tc.env(t)
			for i := range 2 {
				code, out, errOut := runMain(t, context.Background(), env, "migrate")
				if code != 0 || !strings.Contains(out, tc.name) {
					t.Fatalf("migrate #%d: exit %d, out %q, err %q", i+1, code, out, errOut)
				}
			}
		})
	}
}

func TestBackupCommandUsageErrors(t *testing.T) {
	env := map[string]string{"DATA_DIR": t.TempDir()}
	for _, args := range [][]string{
		{"backup-now", "--reason", "Not Valid"},
		{"backup-now", "--timeout", "-1s"},
		{"backup-now", "extra"},
		{"restore", "--id", "x"},
		{"restore", "--id", "-3"},
		{"restore", "--id", "p"},
		{"restore", "--id", "q3"},
		{"restore", "--at", "yesterday"},
		{"restore", "--id", "p3", "--at", "2026-11-26T12:00:00Z"},
		{"snapshots", "--nope"},
		{"migrate", "now"},
	} {
		if code, _, errOut := runMain(t, context.Background(), env, args...); code != 2 {
			t.Errorf("%v: exit %d (%s); want 2", args, code, errOut)
		}
	}
	// Production without a key refuses to start: plaintext sessions at rest
	// only when asked for.
	prod := map[string]string{"DATA_DIR": t.TempDir(), "NODE_ENV": "production", "NATS_URL": "nats://127.0.0.1:1",
		"NATS_INTERNAL_SECRET": "backup-usage-internal-secret"}
	code, _, errOut := runMain(t, context.Background(), prod, "backup")
	if code != 2 || !strings.Contains(errOut, "SESSION_ENCRYPTION_KEY") || !strings.Contains(errOut, "ALLOW_PLAINTEXT_BACKUPS") {
		t.Fatalf("backup in production without a key: exit %d, %q", code, errOut)
	}
}

// TestBackupCommands drives the backup role and the operator commands
// against real PostgreSQL and a NATS server, as in the compose split.
func TestBackupCommands(t *testing.T) {
	db := testdb.Postgres(t)
	const token = "backup-cmd-test-token"
	const secret = "backup-cmd-internal-secret"
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: token, InternalSecret: secret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	envFor := func(dataDir string) map[string]string {
		return map[string]string{
			"SESSION_ID": "Cmd Test", "DATA_DIR": dataDir, "DATABASE_URL": db.URL, "NATS_URL": srv.ClientURL(),
			"NATS_TOKEN": token, "NATS_INTERNAL_SECRET": secret, "SHUTDOWN_TIMEOUT": "20s", "LOG_LEVEL": "warn",
			"SYNC_INTERVAL": "0", // full snapshots; TestPointCommands covers continuous replication
		}
	}
	ctx := context.Background()

	// No NATS at all: a quick, clear failure.
	noNATS := envFor(t.TempDir())
	noNATS["NATS_URL"] = "nats://127.0.0.1:1"
	begin := time.Now()
	code, _, errOut := runMain(t, ctx, noNATS, "backup-now", "--timeout", "30s")
	if code != 1 || !strings.Contains(errOut, "cannot reach NATS") || time.Since(begin) > 15*time.Second {
		t.Fatalf("backup-now without NATS: exit %d after %s, %q", code, time.Since(begin), errOut)
	}

	// Nobody serves backup.request yet.
	first := t.TempDir()
	code, _, errOut = runMain(t, ctx, envFor(first), "backup-now", "--timeout", "5s")
	if code != 1 || !strings.Contains(errOut, "no backup service") {
		t.Fatalf("backup-now without a service: exit %d, %q", code, errOut)
	}

	if err := wastore.Create(ctx, filepath.Join(first, "session.db"), 256<<10); err != nil {
		t.Fatal(err)
	}
	runRole(t, envFor(first), "backup")
	var out string
	testwait.For(t, 20*time.Second, "backup-now to succeed", func() bool {
		code, out, errOut = runMain(t, ctx, envFor(first), "backup-now", "--reason", "restore-point", "--timeout", "20s")
		if code != 0 && !strings.Contains(errOut, "no backup service") {
			t.Fatalf("backup-now: exit %d, %q", code, errOut)
		}
		return code == 0
	})
	var rep bus.BackupReply
	if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.OK || rep.Snapshot == nil || rep.Snapshot.ID == 0 {
		t.Fatalf("backup-now printed %q (%v)", out, err)
	}

	code, out, errOut = runMain(t, ctx, envFor(first), "snapshots")
	if code != 0 || !strings.Contains(out, "restore-point") || !strings.Contains(out, "database+local") ||
		!strings.Contains(out, rep.Snapshot.SHA256[:12]) {
		t.Fatalf("snapshots: exit %d\n%s\n%s", code, out, errOut)
	}

	// restore refuses to overwrite the live store without --force.
	code, _, errOut = runMain(t, ctx, envFor(first), "restore")
	if code != 1 || !strings.Contains(errOut, "--force") {
		t.Fatalf("restore over an existing store: exit %d, %q", code, errOut)
	}

	// An unknown id writes nothing.
	third := t.TempDir()
	if code, _, _ := runMain(t, ctx, envFor(third), "restore", "--id", "987654"); code != 1 {
		t.Fatalf("restore of an unknown id: exit %d", code)
	}
	if _, err := os.Stat(filepath.Join(third, "session.db")); !os.IsNotExist(err) {
		t.Fatalf("restore of an unknown id wrote a file: %v", err)
	}

	// A fresh disk gets the snapshot back.
	second := t.TempDir()
	code, out, errOut = runMain(t, ctx, envFor(second), "restore", "--id", strconv.FormatInt(rep.Snapshot.ID, 10))
	if code != 0 || !strings.Contains(out, `"restored":true`) {
		t.Fatalf("restore: exit %d, %q, %q", code, out, errOut)
	}
	if has, err := snapshot.HasDevice(ctx, filepath.Join(second, "session.db")); err != nil || !has {
		t.Fatalf("restored store: device %v, %v", has, err)
	}
	if got := fileSHA(t, filepath.Join(second, "session.db")); got != rep.Snapshot.SHA256 {
		t.Fatalf("restored sha %s; want %s", got, rep.Snapshot.SHA256)
	}
}
