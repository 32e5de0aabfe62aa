package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/nats-io/nats.go"
)

// TestSplitRolesNeedABusAddress: backup and health in their own processes
// never dial the default address on a guess (a system NATS server there
// would receive the role's password): without NATS_URL, NATS_LISTEN or a
// usable bus.json they exit 2 naming NATS_URL.
func TestSplitRolesNeedABusAddress(t *testing.T) {
	for _, role := range []string{"backup", "health"} {
		env := map[string]string{"DATA_DIR": t.TempDir(), "PORT": "0", "NATS_INTERNAL_SECRET": "internal-secret-of-the-test"}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		code, _, errOut := runMain(t, ctx, env, role)
		cancel()
		if code != 2 || !strings.Contains(errOut, "NATS_URL") || !strings.Contains(errOut, bus.BusFileName) {
			t.Fatalf("%s without a bus address: exit %d, %q", role, code, errOut)
		}
	}
}

// TestClientWithoutBusSaysWhyBusFileWasSkipped: a client command with no
// NATS_URL, no NATS_LISTEN and no usable bus.json does not dial the
// default address; it says why bus.json was not used.
func TestClientWithoutBusSaysWhyBusFileWasSkipped(t *testing.T) {
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		plant func(dir string)
		want  string
	}{
		"missing": {func(string) {}, "not found in DATA_DIR="},
		"stale": {func(dir string) {
			if err := bus.WriteBusFile(dir, bus.BusFile{URL: "nats://127.0.0.1:1", PID: dead.Process.Pid}); err != nil {
				t.Fatal(err)
			}
		}, "stale: pid " + strconv.Itoa(dead.Process.Pid)},
		"untrusted": {func(dir string) {
			if err := bus.WriteBusFile(dir, bus.BusFile{URL: "nats://127.0.0.1:1", PID: os.Getpid()}); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Join(dir, bus.BusFileName), 0o666); err != nil {
				t.Fatal(err)
			}
		}, "not trusted"},
	} {
		dir := t.TempDir()
		tc.plant(dir)
		for _, args := range [][]string{{"backup-now", "--timeout", "5s"}, {"sandbox", "outbox"}} {
			code, _, errOut := runMain(t, context.Background(), map[string]string{"DATA_DIR": dir}, args...)
			if code == 0 || !strings.Contains(errOut, tc.want) || !strings.Contains(errOut, "bus.json") ||
				strings.Contains(errOut, "4222") || strings.Contains(errOut, "cannot reach") {
				t.Errorf("%s, bus.json %s: exit %d, %q; want it to say %q without dialling", args[0], name, code, errOut, tc.want)
			}
			if name == "missing" && !strings.Contains(errOut, "DATA_DIR="+dir) {
				t.Errorf("%s: %q does not name the absolute DATA_DIR %s", args[0], errOut, dir)
			}
		}
	}
}

// TestClientUsesTheSessionOfBusFile: without SESSION_ID, backup-now asks
// the session of the run that wrote bus.json; with another SESSION_ID the
// error says both, and every error names the URL and that it came from
// bus.json.
func TestClientUsesTheSessionOfBusFile(t *testing.T) {
	const token = "bots-token-of-the-session-test"
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: token})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	backup, err := srv.ConnectAs(bus.RoleBackup, "backup", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer backup.Close()
	if _, err := backup.Subscribe(bus.NewSubjects("rv3").BackupRequest(), func(m *nats.Msg) {
		_ = bus.Respond(m, bus.BackupReply{OK: true, JobID: 1, Stored: bus.StoredDatabase})
	}); err != nil {
		t.Fatal(err)
	}
	if err := backup.Flush(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := bus.WriteBusFile(dir, bus.BusFile{URL: srv.ClientURL(), Token: token, PID: os.Getpid(), Session: "rv3"}); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runMain(t, context.Background(), map[string]string{"DATA_DIR": dir}, "backup-now", "--timeout", "5s")
	if code != 0 || !strings.Contains(out, `"ok":true`) {
		t.Fatalf("backup-now without SESSION_ID beside a run on rv3: exit %d, %q, %q", code, out, errOut)
	}
	code, _, errOut = runMain(t, context.Background(), map[string]string{"DATA_DIR": dir, "SESSION_ID": "other"}, "backup-now", "--timeout", "5s")
	abs, _ := filepath.Abs(filepath.Join(dir, bus.BusFileName))
	for _, want := range []string{"no backup service answers", srv.ClientURL(), "from bus.json " + abs, `SESSION_ID is "other"`, `"rv3"`} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Errorf("backup-now with SESSION_ID=other: exit %d, %q lacks %q", code, errOut, want)
		}
	}
}

// TestNATSCommandIsPastable: the logged nats command names bus.json by its
// absolute path and dials 127.0.0.1 when the bus listens on a wildcard.
func TestNATSCommandIsPastable(t *testing.T) {
	t.Chdir(t.TempDir())
	a := &app{cfg: &config.Config{DataDir: "data", SessionID: "S"}}
	abs, _ := filepath.Abs(filepath.Join("data", bus.BusFileName))
	for _, url := range []string{"nats://0.0.0.0:4222", "nats://[::]:4222"} {
		cmd := a.natsCommand(url, true)
		if !strings.Contains(cmd, shellQuote(abs)) || !strings.Contains(cmd, "@127.0.0.1:4222 ") {
			t.Errorf("nats command for %s: %s; want %s and 127.0.0.1", url, cmd, abs)
		}
	}
}
