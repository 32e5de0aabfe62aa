package gateway

import (
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// When backup loses the session lease to another instance it says so on
// conn.standby: the gateway must close its socket and store, and open them
// again only after backup has restored the session anew (CONTRACT guarantee
// 2: two sockets never fight over one session).
func TestLeaseLostClosesTheSocketUntilRestoredAgain(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	var restores atomic.Int32
	var allow atomic.Bool
	allow.Store(true)
	h.serveRestore(func(m *nats.Msg) {
		if !allow.Load() {
			return // backup in standby holds the request
		}
		restores.Add(1)
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Restored: true, Source: bus.SourceDatabase, SnapshotID: 7})
	})
	h.advanceUntilOpen(t)
	h.connected()

	// Backup loses the lease: from now on it holds restore requests.
	allow.Store(false)
	lost := bus.ConnEvent{Instance: testUnit, Kind: bus.ConnStandby, Reason: "lease lost to another instance"}
	lost.Stamp("Test-Bot", h.clock.Now())
	if err := bus.Publish(h.nc, h.subj.Conn(bus.ConnStandby), lost); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "socket and store closed", func() bool {
		return h.conn.get(func(f *fakeConn) int { return f.closes }) == 1 && !h.conn.IsConnected()
	})
	testwait.For(t, 5*time.Second, "gateway in standby", func() bool { return h.gw.State() == bus.StateStandby })
	connects := h.conn.get(func(f *fakeConn) int { return f.connects })

	// While backup holds the request nothing reconnects, however long.
	h.advance(10 * time.Minute)
	if got := h.conn.get(func(f *fakeConn) int { return f.connects }); got != connects {
		t.Fatalf("connected %d more times while another instance held the lease", got-connects)
	}
	if len(h.opens) != 0 {
		t.Fatal("the store was opened again before backup restored it")
	}

	// The lease is back and backup restored: the store opens again, then the socket.
	allow.Store(true)
	h.advanceUntilOpen(t)
	if restores.Load() < 2 {
		t.Fatalf("store reopened after %d restores, want a second one first", restores.Load())
	}
	testwait.For(t, 5*time.Second, "a new connect", func() bool {
		return h.conn.get(func(f *fakeConn) int { return f.connects }) > connects
	})
}

// Only a well-formed conn.standby event is a lease loss: an empty message,
// a reply a bot steered there or another kind's event leave the socket open.
func TestMalformedStandbyKeepsTheSocket(t *testing.T) {
	var logs testlog.Buffer
	h := startWith(t, func(d *Deps) {
		d.Log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{OK: true, Source: bus.SourceNone, Instance: testUnit})
	})
	h.advanceUntilOpen(t)
	h.connected()
	bodies := []string{
		``,
		`{"ok":false,"error":"bad JSON"}`,
		`{"session":"Test-Bot","at":"2026-01-01T00:00:00Z","kind":"connected"}`,
		`{"session":"Test-Bot","kind":"standby"}`,
	}
	for _, b := range bodies {
		if err := h.nc.Publish(h.subj.Conn(bus.ConnStandby), []byte(b)); err != nil {
			t.Fatal(err)
		}
	}
	testwait.For(t, 5*time.Second, "every bad conn.standby ignored", func() bool {
		return strings.Count(logs.String(), "ignoring a bad conn.standby") == len(bodies)
	})
	if h.conn.get(func(f *fakeConn) int { return f.closes }) != 0 || !h.conn.IsConnected() || h.gw.State() != bus.StateConnected {
		t.Fatalf("a malformed conn.standby closed the socket: state %s", h.gw.State())
	}
}
