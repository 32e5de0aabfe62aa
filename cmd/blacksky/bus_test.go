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

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// startDefault runs Main with env and NATS_LISTEN's default replaced by
// defaultListen, and returns once it is ready.
func startDefault(t *testing.T, env map[string]string, defaultListen string, args ...string) (ReadyInfo, *testlog.Buffer, func() error) {
	t.Helper()
	ready := make(chan ReadyInfo, 1)
	logs := &testlog.Buffer{}
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
	var out, errOut string
	var code int
	testwait.For(t, 30*time.Second, "backup-now to get an answer", func() bool {
		code, out, errOut = runMain(t, context.Background(), map[string]string{"SESSION_ID": "Bus File", "DATA_DIR": dataDir},
			"backup-now", "--timeout", "20s")
		// The backup service may not serve backup.request yet at the very
		// start; anything else is a result.
		return code == 0 || !strings.Contains(errOut, "no backup service")
	})
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
// silently replaced; like a taken PORT it exits 2 naming NATS_LISTEN and
// the address.
func TestTakenExplicitNATSListenFails(t *testing.T) {
	taken := takenPort(t)
	for _, role := range []string{"gateway", "run"} {
		env := map[string]string{"DATA_DIR": t.TempDir(), "PORT": "0", "NATS_LISTEN": taken, "ENABLE_SESSION_BACKUP": "false"}
		code, _, errOut := runMain(t, context.Background(), env, role)
		if code != 2 || !strings.Contains(errOut, "NATS_LISTEN") || !strings.Contains(errOut, taken) {
			t.Fatalf("%s with NATS_LISTEN=%s taken: exit %d, %q", role, taken, code, errOut)
		}
	}
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// TestRunOnTheSampleServerConfig: `blacksky run` against an external
// nats-server configured from deploy/nats-server.conf, as docs/heroku.md
// says: every service joins as its role (their heartbeats arrive, backup
// may answer a bot's backup.request), and a bot cannot speak for them.
func TestRunOnTheSampleServerConfig(t *testing.T) {
	const token, secret = "sample-conf-bots-token", "sample-conf-internal-secret"
	t.Setenv("NATS_TOKEN", token)
	t.Setenv("NATS_INTERNAL_SECRET", secret)
	opts, err := server.ProcessConfigFile("../../deploy/nats-server.conf")
	if err != nil {
		t.Fatal(err)
	}
	opts.Host, opts.Port, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, true, true
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	dataDir := t.TempDir()
	if err := wastore.Create(context.Background(), filepath.Join(dataDir, "session.db"), 64<<10); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"SESSION_ID": "Sample Conf", "DATA_DIR": dataDir, "PORT": "0", "NATS_URL": ns.ClientURL(),
		"NATS_TOKEN": token, "NATS_INTERNAL_SECRET": secret, "RECONNECT_MIN": "20ms", "RECONNECT_MAX": "200ms", "SHUTDOWN_TIMEOUT": "20s"}
	_, logs, stop := startDefault(t, env, "", "run")
	if strings.Contains(logs.String(), "trusts") || strings.Contains(logs.String(), "cannot tell them") {
		t.Fatalf("warned about an untrusted bus although roles are configured:\n%s", logs.String())
	}

	// A bot, as the file's header says: user "bot", NATS_TOKEN as password.
	bot, err := bus.Dial(ns.ClientURL(), bus.Credential{User: "bot", Password: token}, "bot", 5*time.Second, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer bot.Close()
	subj := bus.NewSubjects("Sample Conf")
	beats := make(chan *nats.Msg, 64)
	if _, err := bot.ChanSubscribe(subj.HeartbeatAll(), beats); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	deadline := time.After(3 * bus.HeartbeatInterval)
	for len(seen) < 3 {
		select {
		case m := <-beats:
			seen[bus.Kind(m.Subject)] = true
		case <-deadline:
			t.Fatalf("heartbeats seen from %v, want gateway, backup and health\n%s", seen, logs.String())
		}
	}
	var rep bus.BackupReply
	var reqErr error
	testwait.For(t, 30*time.Second, "backup to serve backup.request", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		reqErr = bus.Request(ctx, bot, subj.BackupRequest(), bus.BackupRequest{Reason: bus.ReasonManual}, &rep)
		return !errors.Is(reqErr, nats.ErrNoResponders)
	})
	if reqErr != nil || !rep.OK {
		t.Fatalf("backup.request as a bot: %+v, %v\n%s", rep, reqErr, logs.String())
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
}

// TestRunOnAnUnconfiguredServerWarns: an external NATS_URL without
// NATS_INTERNAL_SECRET still works as before (our services connect with
// NATS_TOKEN), and the log says that such a bus trusts everyone.
func TestRunOnAnUnconfiguredServerWarns(t *testing.T) {
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true, Authorization: "plain-token"})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	env := map[string]string{"SESSION_ID": "Plain", "DATA_DIR": t.TempDir(), "PORT": "0", "NATS_URL": ns.ClientURL(),
		"NATS_TOKEN": "plain-token", "ENABLE_SESSION_BACKUP": "false"}
	_, logs, stop := startDefault(t, env, "", "run")
	if !strings.Contains(logs.String(), "without NATS_INTERNAL_SECRET") || !strings.Contains(logs.String(), "deploy/nats-server.conf") {
		t.Fatalf("no warning about a bus that trusts everyone:\n%s", logs.String())
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
}

// TestSplitRolesNeedTheInternalSecret: backup and health in their own
// processes cannot join a bus with roles without it: exit 2, named.
func TestSplitRolesNeedTheInternalSecret(t *testing.T) {
	for _, role := range []string{"backup", "health"} {
		env := map[string]string{"DATA_DIR": t.TempDir(), "PORT": "0", "NATS_URL": "nats://127.0.0.1:1", "NATS_TOKEN": "a-token"}
		code, _, errOut := runMain(t, context.Background(), env, role)
		if code != 2 || !strings.Contains(errOut, "NATS_INTERNAL_SECRET") {
			t.Fatalf("%s without NATS_INTERNAL_SECRET: exit %d, %q", role, code, errOut)
		}
	}
}
