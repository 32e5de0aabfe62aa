package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// TestGatewayRole runs `blacksky gateway` with its embedded NATS on a TCP
// port and a real whatsmeow client on the closed network: the bus shows the
// retries and heartbeats, nobody answers msg.send (relay's, another role),
// and a cancel
// (SIGTERM) ends with conn.stopped and exit 0.
func TestGatewayRole(t *testing.T) {
	dataDir := t.TempDir()
	env := map[string]string{
		"SESSION_ID": "GW Role", "DATA_DIR": dataDir, "ENABLE_SESSION_BACKUP": "false",
		"NATS_LISTEN": "127.0.0.1:0", "NATS_TOKEN": "gw-role-token",
		"RECONNECT_MIN": "10ms", "RECONNECT_MAX": "50ms", "LOG_LEVEL": "debug",
	}
	ready := make(chan ReadyInfo, 1)
	var logs testlog.Buffer
	m := &Main{Stdout: io.Discard, Stderr: &logs, Getenv: func(k string) string { return env[k] },
		Ready: func(info ReadyInfo) { ready <- info }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, []string{"gateway"}) }()
	var info ReadyInfo
	select {
	case info = <-ready:
	case err := <-done:
		t.Fatalf("gateway role stopped: %v\n%s", err, logs.String())
	case <-time.After(20 * time.Second):
		t.Fatal("gateway role not ready in 20 s")
	}
	if !strings.HasPrefix(info.NATSURL, "nats://127.0.0.1:") {
		t.Fatalf("NATS URL = %q", info.NATSURL)
	}

	nc, err := bus.Connect(info.NATSURL, "gw-role-token", "test", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	subj := bus.NewSubjects("GW Role")
	var mu sync.Mutex
	var kinds []string
	var states []string
	for _, s := range []string{subj.ConnAll(), subj.Heartbeat(bus.ServiceGateway)} {
		if _, err := nc.Subscribe(s, func(m *nats.Msg) {
			mu.Lock()
			defer mu.Unlock()
			if strings.Contains(m.Subject, ".heartbeat.") {
				var hb bus.Heartbeat
				_ = json.Unmarshal(m.Data, &hb)
				states = append(states, hb.State)
				return
			}
			kinds = append(kinds, bus.Kind(m.Subject))
		}); err != nil {
			t.Fatal(err)
		}
	}
	seen := func(list *[]string, want string) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, k := range *list {
				if k == want {
					return true
				}
			}
			return false
		}
	}
	testwait.For(t, 20*time.Second, "conn.reconnecting", seen(&kinds, bus.ConnReconnecting))
	// The first heartbeat went out before we subscribed; the next comes
	// within one interval.
	testwait.For(t, 2*bus.HeartbeatInterval, "a gateway heartbeat", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(states) > 0
	})

	// Relay answers msg.send, and it is not part of this role: the gateway
	// itself no longer does.
	if _, err := nc.Request(subj.MsgSend(), []byte(`{"to":"15551234567","text":"hi"}`), 5*time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("msg.send with the gateway role alone: %v, want no responders", err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("gateway role returned %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("gateway role did not stop")
	}
	if !seen(&kinds, bus.ConnStopped)() {
		// The role flushed conn.stopped before closing its bus; TCP delivery
		// to us may still be in flight.
		testwait.For(t, 5*time.Second, "conn.stopped", seen(&kinds, bus.ConnStopped))
	}
	if _, err := os.Stat(filepath.Join(dataDir, "session.db")); err != nil {
		t.Fatalf("session store: %v", err)
	}
	if strings.Contains(logs.String(), "gw-role-token") {
		t.Fatal("the NATS token leaked into the logs")
	}
}
