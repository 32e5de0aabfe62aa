package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// runRole starts the real Main with env and returns once it is ready, with
// a stop function that cancels it (SIGTERM) and returns its error.
func runRole(t *testing.T, env map[string]string, args ...string) (ReadyInfo, *testlog.Buffer, func() error) {
	t.Helper()
	ready := make(chan ReadyInfo, 1)
	logs := &testlog.Buffer{}
	m := &Main{Stdout: io.Discard, Stderr: logs, Getenv: func(k string) string { return env[k] },
		Ready: func(info ReadyInfo) { ready <- info }}
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
	var once sync.Once
	var stopErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case stopErr = <-done:
			case <-time.After(40 * time.Second):
				t.Fatalf("%v did not stop in 40 s\n%s", args, logs.String())
			}
		})
		return stopErr
	}
	t.Cleanup(func() { _ = stop() })
	return info, logs, stop
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	plain, err := snapshot.ReadConsistent(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(plain)
	return hex.EncodeToString(sum[:])
}

// TestRunComesBackLinked is guarantee 1 end to end in the Heroku shape (one
// process): a linked store is snapshotted on request, SIGTERM stops the
// socket first and commits a shutdown snapshot, and a new instance with an
// empty disk restores that store before the gateway opens it.
func TestRunComesBackLinked(t *testing.T) {
	db := testdb.Postgres(t)
	const token = "run-test-nats-token"
	const secret = "run-test-internal-secret"
	const key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	envFor := func(dataDir string) map[string]string {
		return map[string]string{
			"SESSION_ID": "Run Test", "DATA_DIR": dataDir, "PORT": "0", "DATABASE_URL": db.URL,
			"NATS_LISTEN": "127.0.0.1:0", "NATS_TOKEN": token, "NATS_INTERNAL_SECRET": secret, "SESSION_ENCRYPTION_KEY": key,
			"HEALTH_TOKEN": "run-test-health-token", "RECONNECT_MIN": "20ms", "RECONNECT_MAX": "200ms",
			"SHUTDOWN_TIMEOUT": "20s", "LOG_LEVEL": "debug",
		}
	}
	subj := bus.NewSubjects("Run Test")

	first := t.TempDir()
	if err := wastore.Create(context.Background(), filepath.Join(first, "session.db"), 256<<10); err != nil {
		t.Fatal(err)
	}
	info, logs, stop := runRole(t, envFor(first), "run")

	// The port answers at once.
	resp, err := http.Get("http://" + info.HTTPAddr + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz: %v %v", resp, err)
	}
	resp.Body.Close()

	nc, err := bus.Connect(info.NATSURL, token, "run-test", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var mu sync.Mutex
	var kinds []string
	if _, err := nc.Subscribe(subj.ConnAll(), func(m *nats.Msg) {
		mu.Lock()
		kinds = append(kinds, bus.Kind(m.Subject))
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	seen := func(kind string) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, k := range kinds {
				if k == kind {
					return true
				}
			}
			return false
		}
	}
	// The gateway got its restore answer ("existing"), opened the store and
	// keeps retrying the unreachable WhatsApp.
	testwait.For(t, 30*time.Second, "conn.reconnecting", seen(bus.ConnReconnecting))
	// Relay is ready (its database open) before the gateway starts: the
	// gateway acknowledges messages to WhatsApp only once relay stored them.
	var firstGateway, relayReady = -1, -1
	for i, line := range strings.Split(logs.String(), "\n") {
		if firstGateway < 0 && strings.Contains(line, "service=gateway") {
			firstGateway = i
		}
		if relayReady < 0 && strings.Contains(line, "relay ready") {
			relayReady = i
		}
	}
	if relayReady < 0 || firstGateway < relayReady {
		t.Fatalf("the gateway logged (line %d) before relay was ready (line %d):\n%s", firstGateway, relayReady, logs.String())
	}

	// A manual snapshot over NATS is committed before the reply comes.
	msg, err := nc.Request(subj.BackupRequest(), []byte(`{"reason":"manual"}`), 60*time.Second)
	if err != nil {
		t.Fatalf("backup request: %v\n%s", err, logs.String())
	}
	var reply bus.BackupReply
	if err := json.Unmarshal(msg.Data, &reply); err != nil || !reply.OK || reply.Snapshot == nil || reply.Snapshot.ID == 0 {
		t.Fatalf("backup reply %s (%v)", msg.Data, err)
	}

	// /status shows every service.
	testwait.For(t, 15*time.Second, "three services in /status", func() bool {
		req, _ := http.NewRequest(http.MethodGet, "http://"+info.HTTPAddr+"/status", nil)
		req.Header.Set("Authorization", "Bearer run-test-health-token")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		s := string(body)
		return strings.Contains(s, `"gateway"`) && strings.Contains(s, `"backup"`) && strings.Contains(s, `"health"`)
	})

	// Make the store differ from the manual snapshot, so the shutdown
	// snapshot is a new row rather than "unchanged".
	w, err := wastore.StartWriter(context.Background(), filepath.Join(first, "session.db"))
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "a committed write", func() bool { return w.Last() > 0 })
	if _, err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	lastSHA := fileSHA(t, filepath.Join(first, "session.db"))

	if err := stop(); err != nil {
		t.Fatalf("run returned %v after SIGTERM\n%s", err, logs.String())
	}
	if !seen(bus.ConnStopped)() {
		testwait.For(t, 5*time.Second, "conn.stopped", seen(bus.ConnStopped))
	}
	out := logs.String()
	// The gateway asks before backup has subscribed: a normal start says
	// nothing about it.
	if strings.Contains(out, "not answering the restore request") {
		t.Errorf("a normal start logged that backup does not answer the restore request:\n%s", out)
	}
	for _, s := range []string{token, secret, key, "run-test-health-token"} {
		if strings.Contains(out, s) {
			t.Fatalf("secret %q leaked into logs", s)
		}
	}

	// A new dyno: empty disk, same database.
	second := t.TempDir()
	info2, logs2, stop2 := runRole(t, envFor(second), "run")
	_ = info2
	restored := filepath.Join(second, "session.db")
	testwait.For(t, 30*time.Second, "the restored session.db", func() bool {
		_, err := os.Stat(restored)
		return err == nil
	})
	// Only our own services may ask for a restore: ask as the gateway does.
	nc2, err := bus.ConnectWith(info2.NATSURL, bus.RoleCredential(bus.RoleGateway, secret), "run-test-2", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	// The restore subject names the instance: in run, the process's name,
	// as its backup heartbeat says.
	hbMsg, err := nc2.SubscribeSync(subj.Heartbeat(bus.ServiceBackup))
	if err != nil {
		t.Fatal(err)
	}
	beat, err := hbMsg.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var hb bus.Heartbeat
	if err := json.Unmarshal(beat.Data, &hb); err != nil {
		t.Fatal(err)
	}
	msg, err = nc2.Request(subj.SessionRestoreFor(bus.InstanceToken(hb.Instance)), []byte(`{}`), 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var rr bus.RestoreReply
	if err := json.Unmarshal(msg.Data, &rr); err != nil || !rr.OK || !rr.Restored || rr.Source != bus.SourceDatabase {
		t.Fatalf("restore reply %s (%v)\n%s", msg.Data, err, logs2.String())
	}
	if got := fileSHA(t, restored); got != lastSHA {
		t.Fatalf("restored store %s, want the last one used %s", got[:12], lastSHA[:12])
	}
	if err := stop2(); err != nil {
		t.Fatalf("second run: %v", err)
	}
}
