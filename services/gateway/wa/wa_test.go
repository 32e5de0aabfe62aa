package wa

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/proto/waAdv"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/store/sqlstore"
	"go.mau.fi/whatsmeow/types"
	"go.uber.org/goleak"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// The real whatsmeow client on this machine's closed network: every dial
// fails, and the supervisor keeps retrying with growing attempt numbers.
func TestRealClientRetriesOnClosedNetwork(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "session.db")
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	gwNC, err := srv.Connect("gateway", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer gwNC.Close()
	nc, err := srv.Connect("test", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	subj := bus.NewSubjects("IT-Session")

	var mu sync.Mutex
	var evs []bus.ConnEvent
	sub, err := nc.Subscribe(subj.ConnAll(), func(m *nats.Msg) {
		var e bus.ConnEvent
		if err := json.Unmarshal(m.Data, &e); err != nil {
			t.Errorf("decode %s: %v", m.Subject, err)
		}
		mu.Lock()
		evs = append(evs, e)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	g := gateway.New(gateway.Config{
		Session:      "IT-Session",
		Instance:     "it",
		ReconnectMin: 10 * time.Millisecond,
		ReconnectMax: 100 * time.Millisecond,
	}, gateway.Deps{
		NC: gwNC,
		Open: func(ctx context.Context) (gateway.Conn, error) {
			return Open(ctx, Options{Path: path, BotName: "blacksky-test", Log: discard()})
		},
		Log: discard(),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()

	snapshot := func() []bus.ConnEvent {
		mu.Lock()
		defer mu.Unlock()
		return append([]bus.ConnEvent(nil), evs...)
	}
	testwait.For(t, 30*time.Second, "four reconnect attempts", func() bool {
		n := 0
		for _, e := range snapshot() {
			if e.Kind == bus.ConnReconnecting {
				n++
			}
		}
		return n >= 4
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop")
	}

	testwait.For(t, 5*time.Second, "conn.stopped", func() bool {
		got := snapshot()
		return got[len(got)-1].Kind == bus.ConnStopped
	})
	got := snapshot()
	if got[0].Kind != bus.ConnConnecting {
		t.Fatalf("first event %q, want connecting; all %v", got[0].Kind, got)
	}
	attempt := 0
	for i, e := range got {
		switch e.Kind {
		case bus.ConnReconnecting:
			if e.Attempt != attempt+1 || e.DelayMS < 10 || e.DelayMS > 100 {
				t.Fatalf("event %d: reconnecting attempt %d delay %dms after attempt %d", i, e.Attempt, e.DelayMS, attempt)
			}
			attempt = e.Attempt
		case bus.ConnConnecting:
			if e.Attempt != attempt {
				t.Fatalf("event %d: connecting attempt %d, want %d", i, e.Attempt, attempt)
			}
		case bus.ConnStopped:
			if i != len(got)-1 {
				t.Fatalf("stopped is not last: %v", got)
			}
		default:
			t.Fatalf("unexpected event %q on a closed network", e.Kind)
		}
	}
	if got[len(got)-1].Kind != bus.ConnStopped {
		t.Fatalf("last event %q, want stopped", got[len(got)-1].Kind)
	}

	// The store is whatsmeow's schema in WAL mode, closed cleanly.
	db, err := sql.Open("sqlite", DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var mode string
	var version int
	if err := db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v", mode, err)
	}
	if err := db.QueryRow("SELECT version FROM whatsmeow_version").Scan(&version); err != nil || version < 1 {
		t.Fatalf("whatsmeow_version = %d, %v", version, err)
	}
}

func TestOpenResetClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "session.db")
	c, err := Open(t.Context(), Options{Path: path, BotName: "My Bot", Log: discard()})
	if err != nil {
		t.Fatal(err)
	}
	if store.DeviceProps.GetOs() != "My Bot" {
		t.Fatalf("device name = %q", store.DeviceProps.GetOs())
	}
	if !c.JID().IsEmpty() || c.IsConnected() {
		t.Fatal("a new store has no device and no socket")
	}
	before := c.cli.Load()
	if err := c.ResetDevice(t.Context()); err != nil {
		t.Fatalf("ResetDevice: %v", err)
	}
	if c.cli.Load() == before || c.cli.Load().EnableAutoReconnect {
		t.Fatal("ResetDevice must build a fresh client with auto-reconnect off")
	}
	if !before.EnableDecryptedEventBuffer || !c.cli.Load().EnableDecryptedEventBuffer {
		t.Fatal("the decrypted event buffer must be on, so a redelivered message is not dropped")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopening works (the store was closed, not left locked).
	c2, err := Open(t.Context(), Options{Path: path, Log: discard()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
}

// whatsmeow deletes the device itself on a logout, on another goroutine;
// ResetDevice running meanwhile must neither race with it (go test -race)
// nor report an error.
func TestResetDeviceWhileWhatsmeowDeletes(t *testing.T) {
	tests := []struct {
		name   string
		linked bool // the store holds a device with a JID
	}{
		{"linked device being deleted", true},
		{"fresh device", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "session.db")
			if tt.linked {
				putLinkedDevice(t, path)
			}
			c, err := Open(t.Context(), Options{Path: path, Log: discard()})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.JID().IsEmpty() == tt.linked {
				t.Fatalf("JID = %v before the reset", c.JID())
			}
			dev := c.cli.Load().Store
			deleted := make(chan error, 1)
			go func() {
				if tt.linked {
					deleted <- dev.Delete(context.Background()) // what whatsmeow does on LoggedOut
					return
				}
				deleted <- nil
			}()
			if err := c.ResetDevice(t.Context()); err != nil {
				t.Fatalf("ResetDevice: %v", err)
			}
			if err := <-deleted; err != nil {
				t.Fatalf("whatsmeow's delete: %v", err)
			}
			if !c.JID().IsEmpty() || c.cli.Load().Store == dev || c.cli.Load().EnableAutoReconnect {
				t.Fatal("ResetDevice must leave a fresh device on a client with auto-reconnect off")
			}
		})
	}
}

// putLinkedDevice stores a device with a JID at path, as pairing would.
func putLinkedDevice(t *testing.T, path string) {
	t.Helper()
	container, err := sqlstore.New(t.Context(), "sqlite", DSN(path), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer container.Close()
	dev := container.NewDevice()
	jid := types.NewJID("15559998888", types.DefaultUserServer)
	jid.Device = 12
	dev.ID = &jid
	dev.Account = &waAdv.ADVSignedDeviceIdentity{
		Details:             []byte{1},
		AccountSignature:    make([]byte, 64),
		AccountSignatureKey: make([]byte, 32),
		DeviceSignature:     make([]byte, 64),
	}
	if err := container.PutDevice(t.Context(), dev); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRejectsAnEmptyPath(t *testing.T) {
	if _, err := Open(t.Context(), Options{Path: ""}); err == nil {
		t.Error("Open with no path succeeded")
	}
}

// The session store is created where DATA_DIR says, "%41", "?" and "#"
// included, and it, its WAL and its shared memory are readable by their
// owner only, whatever the umask: they hold the device's keys.
func TestOpenKeepsThePathExactAndTheFilesPrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "data%41?mode=ro#x")
	path := filepath.Join(dir, "session.db")
	c, err := Open(t.Context(), Options{Path: path, Log: discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%v: the store was not created at its path", err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s is %o; want 600", filepath.Base(p), st.Mode().Perm())
		}
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("data folder: %v, %v; want 700", st.Mode().Perm(), err)
	}
}

func TestLoggerAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := NewLogger(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))).Sub("Client")
	l.Debugf("hidden %d", 1)
	l.Infof("shown %d", 2)
	l.Warnf("warned %s", "x")
	l.Errorf("failed: %v", "y")
	l.Infof("Successfully paired %s (LID %s)", "15551234567:12@s.whatsapp.net", "123456789012345@lid")
	out := buf.String()
	for _, whole := range []string{"15551234567", "123456789012345"} {
		if strings.Contains(out, whole) {
			t.Errorf("whatsmeow's log line shows the JID %s unmasked:\n%s", whole, out)
		}
	}
	if !strings.Contains(out, "1555****567@s.whatsapp.net") || !strings.Contains(out, "1234****345@lid") {
		t.Errorf("masked JIDs missing:\n%s", out)
	}
	for _, want := range []string{`msg="shown 2"`, "level=WARN", `msg="failed: y"`, "module=whatsmeow/Client"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hidden") {
		t.Errorf("debug line logged at info level:\n%s", out)
	}
}

func TestTerminalQR(t *testing.T) {
	var buf bytes.Buffer
	TerminalQR(&buf)("2@abc,def,ghi")
	if lines := strings.Count(buf.String(), "\n"); lines < 10 {
		t.Fatalf("QR drawing has %d lines", lines)
	}
}

// An open that fails while upgrading the store (a stop cancels it) closes
// the database it opened: goleak (TestMain) finds its connection opener
// otherwise.
func TestOpenCancelledLeavesNoDatabaseOpen(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c, err := Open(ctx, Options{Path: filepath.Join(t.TempDir(), "session.db")})
	if err == nil {
		_ = c.Close()
		t.Fatal("an open with a cancelled context succeeded")
	}
}
