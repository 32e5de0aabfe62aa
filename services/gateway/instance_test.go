package gateway

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// With a shared NATS (a preboot overlap on an external NATS_URL), the
// standby dyno's backup announces conn.standby for its own instance: the
// active gateway keeps its socket. Only its own backup's word closes it.
func TestStandbyOfAnotherInstanceKeepsTheSocket(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceExisting})
	})
	h.advanceUntilOpen(t)
	h.connected()

	for _, ev := range []bus.ConnEvent{
		{Kind: bus.ConnStandby, Instance: "web-1-new-dyno", Reason: "another instance holds the session lease"},
		{Kind: bus.ConnStandby, Reason: "no instance at all"},
	} {
		ev.Stamp("Test-Bot", h.clock.Now()) // well formed: only the instance differs
		if err := bus.Publish(h.nc, h.subj.Conn(bus.ConnStandby), ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.nc.Publish(h.subj.Conn(bus.ConnStandby), nil); err != nil {
		t.Fatal(err)
	}
	if err := h.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	h.probe() // the loop has handled everything published before
	if closes := h.conn.get(func(f *fakeConn) int { return f.closes }); closes != 0 || !h.conn.IsConnected() {
		t.Fatalf("socket closed (%d closes) on another instance's conn.standby", closes)
	}
	if st := h.gw.State(); st != bus.StateConnected {
		t.Fatalf("state = %s, want connected", st)
	}

	own := bus.ConnEvent{Kind: bus.ConnStandby, Instance: testUnit}
	own.Stamp("Test-Bot", h.clock.Now())
	if err := bus.Publish(h.nc, h.subj.Conn(bus.ConnStandby), own); err != nil {
		t.Fatal(err)
	}
	// (Our stand-in backup answers the next restore at once, so the socket
	// opens again right after: the close is what counts.)
	testwait.For(t, 5*time.Second, "socket closed on our own backup's conn.standby", func() bool {
		return h.conn.get(func(f *fakeConn) int { return f.closes }) == 1
	})
}

// A restore answer that does not name our instance (forged, or an old
// backup's) never opens the store.
func TestRestoreAnswerOfAnotherInstanceIgnored(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	answers := make(chan bus.RestoreReply, 2)
	answers <- bus.RestoreReply{Instance: "someone-else", OK: true, Source: bus.SourceNone}
	answers <- bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceDatabase, SnapshotID: 3}
	asked := make(chan struct{}, 8)
	h.serveRestore(func(m *nats.Msg) {
		asked <- struct{}{}
		_ = bus.Respond(m, <-answers)
	})
	h.advanceUntil(time.Second, "the first answer", func() bool { return len(asked) >= 1 })
	if len(h.opens) != 0 {
		t.Fatal("store opened on another instance's restore answer")
	}
	h.advanceUntilOpen(t)
	if len(asked) != 2 {
		t.Fatalf("store opened after %d answers, want the second (our own)", len(asked))
	}
}

// The restore request goes to our instance's subject only: a backup of
// another instance, subscribed to its own subject, never sees it.
func TestRestoreRequestReachesOwnInstanceOnly(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	other := make(chan *nats.Msg, 8)
	sub, err := h.nc.ChanSubscribe(h.subj.SessionRestoreFor("web-1-other"), other)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceExisting})
	})
	h.advanceUntilOpen(t)
	if len(other) != 0 {
		t.Fatalf("another instance's backup got %d restore requests", len(other))
	}
}

// In one process the gateway asks before its backup has subscribed: a
// normal start asks again quickly and says nothing about it at info level.
// Only a backup that stays away is worth a line.
func TestBackupSubscribingLateIsNotNews(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	// No responder yet: the first requests find none.
	h.advanceUntil(noResponderRetry, "a few unanswered attempts", func() bool { return h.gw.attempt() >= 3 })
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceExisting})
	})
	testwait.For(t, 5*time.Second, "the store to open", func() bool {
		h.advance(noResponderRetry)
		return len(h.opens) > 0
	})
	if strings.Contains(h.logs.String(), "not answering the restore request") {
		t.Fatalf("a normal start logged:\n%s", h.logs.String())
	}
}

// A backup that does not come within the grace is reported.
func TestBackupAbsentIsReported(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	h.advanceUntil(time.Second, "the report", func() bool {
		return strings.Contains(h.logs.String(), "not answering the restore request")
	})
}
