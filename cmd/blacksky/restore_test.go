package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
)

// restore --force does not replace the store under a running instance: it
// refuses while another instance holds the session lease, unless told with
// --ignore-lease, and holds the lease itself while it writes.
func TestRestoreForceRespectsTheSessionLease(t *testing.T) {
	ctx := context.Background()
	env, sessionPath, st := restoreSetup(t)
	if _, ok, err := st.AcquireLease(ctx, "Lease Test", "web.1", time.Now(), time.Hour, backup.Lease{}); err != nil || !ok {
		t.Fatalf("lease for the running instance: %v, %v", ok, err)
	}

	// The instance is alive: it keeps renewing while the restore watches.
	renewCtx, stopRenewing := context.WithCancel(ctx)
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-renewCtx.Done():
				return
			case <-tick.C:
				_, _, _ = st.AcquireLease(renewCtx, "Lease Test", "web.1", time.Now(), time.Hour, backup.Lease{})
			}
		}
	}()
	code, _, errOut := runMain(t, ctx, env, "restore", "--force")
	stopRenewing()
	<-renewed
	if code != 1 || !strings.Contains(errOut, `"web.1" holds the session lease`) || !strings.Contains(errOut, "--ignore-lease") {
		t.Fatalf("restore --force under a held lease: exit %d, %q; want a refusal naming the holder", code, errOut)
	}
	if _, err := os.Stat(sessionPath + ".replaced"); !os.IsNotExist(err) {
		t.Fatalf("the refused restore touched the store: %v", err)
	}

	code, out, errOut := runMain(t, ctx, env, "restore", "--force", "--ignore-lease")
	if code != 0 || !strings.Contains(out, `"restored":true`) || !strings.Contains(errOut, "another instance holds the session lease") {
		t.Fatalf("restore --force --ignore-lease: exit %d, %q, %q; want a restore with a warning", code, out, errOut)
	}

	// Once the instance is gone, --force alone works, and leaves the lease free.
	if err := st.ReleaseLease(ctx, "Lease Test", "web.1"); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := runMain(t, ctx, env, "restore", "--force"); code != 0 || !strings.Contains(out, `"restored":true`) {
		t.Fatalf("restore --force with the lease free: exit %d, %q, %q", code, out, errOut)
	}
	if _, ok, err := st.AcquireLease(ctx, "Lease Test", "web.2", time.Now(), time.Minute, backup.Lease{}); err != nil || !ok {
		t.Fatalf("the restore left the lease taken: %v, %v", ok, err)
	}
}

// restore --force watches a dead holder's row with the backup service's own
// rule (backup.LeaseWatch): for the TTL the row advertises, here a previous
// release's 60 s, not only the current 10 s; then it takes the row and
// restores.
func TestRestoreForceWatchesForTheHoldersAdvertisedTTL(t *testing.T) {
	ctx := context.Background()
	env, _, st := restoreSetup(t)
	clock := clockwork.NewFakeClock()
	if _, ok, err := st.AcquireLease(ctx, "Lease Test", "web.1-dead", clock.Now(), time.Minute, backup.Lease{}); err != nil || !ok {
		t.Fatalf("seed lease: %v, %v", ok, err)
	}
	var stdout, stderr bytes.Buffer
	m := &Main{Stdout: &stdout, Stderr: &stderr, Getenv: func(k string) string { return env[k] }, Clock: clock}
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, []string{"restore", "--force"}) }()
	begin := clock.Now()
	var runErr error
	testwait.For(t, 60*time.Second, "restore --force to finish", func() bool {
		select {
		case runErr = <-done:
			return true
		default:
			clock.Advance(250 * time.Millisecond)
			return false
		}
	})
	if runErr != nil {
		t.Fatalf("restore --force: %v (%s)", runErr, stderr.String())
	}
	// Fake time keeps running while the restore itself writes: the upper
	// bound is loose, the lower one is the rule.
	if took := clock.Since(begin); took < time.Minute || took > 90*time.Second {
		t.Fatalf("restore --force took a 60 s row after %s of watching; want 60 s and a little", took)
	}
	if !strings.Contains(stdout.String(), `"restored":true`) {
		t.Fatalf("restore --force: %q", stdout.String())
	}
}

// restoreSetup gives a restore test a DATA_DIR with a linked session store,
// a local snapshot of it, and the migrated embedded database (closed at the
// end of the test): its environment, the session path and the store.
func restoreSetup(t *testing.T) (map[string]string, string, *sqlite.Store) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	env := map[string]string{"SESSION_ID": "Lease Test", "DATA_DIR": dir, "LOG_LEVEL": "warn"}
	sessionPath := filepath.Join(dir, "session.db")
	if err := wastore.Create(ctx, sessionPath, 64<<10); err != nil {
		t.Fatal(err)
	}
	plain, err := snapshot.ReadConsistent(ctx, sessionPath)
	if err != nil {
		t.Fatal(err)
	}
	payload, meta, err := snapshot.Encode(plain, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (backup.Local{Dir: filepath.Join(dir, "backups")}).Write(payload, time.Now(), "manual", meta.SHA256); err != nil {
		t.Fatal(err)
	}
	st, err := sqlite.Open(ctx, filepath.Join(dir, "blacksky.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	if err := st.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	return env, sessionPath, st
}
