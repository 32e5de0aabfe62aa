package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// startDefault runs Main with env and NATS_LISTEN's default replaced by
// defaultListen, and returns once it is ready.
func startDefault(t *testing.T, env map[string]string, defaultListen string, args ...string) (ReadyInfo, *healthLogBuffer, func() error) {
	t.Helper()
	ready := make(chan ReadyInfo, 1)
	logs := &healthLogBuffer{}
	m := &Main{Stdout: io.Discard, Stderr: logs, Getenv: func(k string) string { return env[k] },
		Ready: func(info ReadyInfo) { ready <- info }, DefaultNATSListen: defaultListen}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, args) }()
	var info ReadyInfo
	select {
	case info = <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("%v stopped before ready: %v\n%s", args, err, logs.String())
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatalf("%v not ready in 30 s\n%s", args, logs.String())
	}
	stopped := false
	var stopErr error
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case stopErr = <-done:
			case <-time.After(40 * time.Second):
				t.Fatalf("%v did not stop in 40 s\n%s", args, logs.String())
			}
		}
		return stopErr
	}
	t.Cleanup(func() { _ = stop() })
	return info, logs, stop
}

// takenPort holds a loopback port for the test, as the system NATS server
// holds 4222 on a developer's machine.
func takenPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

// TestBackupNowFindsTheDefaultRun: `blacksky run` with no NATS variable at
// all listens on loopback with a generated token, and `blacksky backup-now`
// beside it (same DATA_DIR, no NATS_URL, no NATS_TOKEN) finds it through
// bus.json, which only this user can read and which is gone after a clean
// exit.
func TestBackupNowFindsTheDefaultRun(t *testing.T) {
	dataDir := t.TempDir()
	if err := wastore.Create(context.Background(), filepath.Join(dataDir, "session.db"), 64<<10); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"SESSION_ID": "Bus File", "DATA_DIR": dataDir, "PORT": "0",
		"RECONNECT_MIN": "20ms", "RECONNECT_MAX": "200ms", "SHUTDOWN_TIMEOUT": "20s"}
	info, logs, stop := startDefault(t, env, "127.0.0.1:0", "run")

	path := filepath.Join(dataDir, bus.BusFileName)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("bus.json: %v\n%s", err, logs.String())
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("bus.json mode %v, want 0600", fi.Mode().Perm())
	}
	f, err := bus.ReadBusFile(dataDir)
	if err != nil || f.URL != info.NATSURL || f.Token == "" || f.Token != info.NATSToken || f.PID != os.Getpid() {
		t.Fatalf("bus.json = %+v (%v), want url %s, the generated token and our pid", f, err, info.NATSURL)
	}

	// The CLI of the same user: the environment names no bus at all.
	var out string
	var code int
	var errOut string
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, out, errOut = runMain(t, context.Background(), map[string]string{"SESSION_ID": "Bus File", "DATA_DIR": dataDir},
			"backup-now", "--timeout", "20s")
		// The backup service may not serve backup.request yet at the very
		// start; anything else is a failure.
		if code == 0 || !strings.Contains(errOut, "no backup service") || time.Now().After(deadline) {
			break
		}
	}
	var rep bus.BackupReply
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || !rep.OK {
		t.Fatalf("backup-now beside the default run: exit %d, %q, %q", code, out, errOut)
	}

	// An unauthenticated client is refused, loopback or not.
	if nc, err := nats.Connect(info.NATSURL, nats.Timeout(5*time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client without a credential was accepted on the TCP bus")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("anonymous client: %v, want an authorization violation", err)
	}

	// The start-up log names the URL and a nats command that reads the
	// token from bus.json; the token itself is never printed.
	text := logs.String()
	if !strings.Contains(text, info.NATSURL) || !strings.Contains(text, `nats --server`) ||
		!strings.Contains(text, "jq -r .token") || strings.Contains(text, f.Token) {
		t.Fatalf("start-up log lacks the bus URL or the nats command, or shows the token:\n%s", text)
	}

	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("bus.json after a clean exit: %v", err)
	}
	// With the bus gone, the client names the address it tried.
	code, _, errOut = runMain(t, context.Background(), map[string]string{"DATA_DIR": dataDir, "NATS_LISTEN": "127.0.0.1:1"},
		"backup-now", "--timeout", "5s")
	if code != 1 || !strings.Contains(errOut, "nats://127.0.0.1:1") || !strings.Contains(errOut, "NATS_LISTEN") {
		t.Fatalf("backup-now with no bus: exit %d, %q", code, errOut)
	}

	// A bus.json left by a crash (its process gone) is not followed, even
	// when something answers at its address, and the error says why.
	other, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: f.Token})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Shutdown()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if err := bus.WriteBusFile(dataDir, bus.BusFile{URL: other.ClientURL(), Token: f.Token, PID: dead.Process.Pid}); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runMain(t, context.Background(), map[string]string{"DATA_DIR": dataDir, "NATS_LISTEN": "127.0.0.1:1"},
		"backup-now", "--timeout", "5s")
	if code != 1 || !strings.Contains(errOut, "nats://127.0.0.1:1") || !strings.Contains(errOut, "stale") {
		t.Fatalf("backup-now with a stale bus.json: exit %d, %q", code, errOut)
	}
}

// TestTakenDefaultNATSListenFallsBack: when the default address is taken
// (the system NATS server holds 4222 here), the bus listens on a free
// loopback port, says so, and bus.json points at it.
func TestTakenDefaultNATSListenFallsBack(t *testing.T) {
	taken := takenPort(t)
	dataDir := t.TempDir()
	env := map[string]string{"SESSION_ID": "Fallback", "DATA_DIR": dataDir, "ENABLE_SESSION_BACKUP": "false",
		"RECONNECT_MIN": "20ms", "RECONNECT_MAX": "200ms"}
	info, logs, _ := startDefault(t, env, taken, "gateway")
	if info.NATSURL == "" || strings.HasSuffix(info.NATSURL, ":"+portOf(taken)) || !strings.HasPrefix(info.NATSURL, "nats://127.0.0.1:") {
		t.Fatalf("bus at %q with %s taken", info.NATSURL, taken)
	}
	if !strings.Contains(logs.String(), "taken") || !strings.Contains(logs.String(), taken) {
		t.Fatalf("the fallback is not in the log:\n%s", logs.String())
	}
	f, err := bus.ReadBusFile(dataDir)
	if err != nil || f.URL != info.NATSURL {
		t.Fatalf("bus.json = %+v (%v), want %s", f, err, info.NATSURL)
	}
	nc, err := bus.Dial(info.NATSURL, bus.BotCredential(info.NATSToken), "t", 5*time.Second, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("the bots' credential from bus.json: %v", err)
	}
	nc.Close()
}

// TestTakenExplicitNATSListenFails: an address the operator chose is not
// silently replaced; the error names NATS_LISTEN and the address.
func TestTakenExplicitNATSListenFails(t *testing.T) {
	taken := takenPort(t)
	for _, role := range []string{"gateway", "run"} {
		env := map[string]string{"DATA_DIR": t.TempDir(), "PORT": "0", "NATS_LISTEN": taken, "ENABLE_SESSION_BACKUP": "false"}
		code, _, errOut := runMain(t, context.Background(), env, role)
		if code == 0 || !strings.Contains(errOut, "NATS_LISTEN") || !strings.Contains(errOut, taken) {
			t.Fatalf("%s with NATS_LISTEN=%s taken: exit %d, %q", role, taken, code, errOut)
		}
	}
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
