package bus_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// A kicked Heartbeater beats at once, without waiting for its interval.
func TestHeartbeaterBeatsOnAKick(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := srv.Connect("test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	subj := bus.NewSubjects("S")
	sub, err := nc.SubscribeSync(subj.Heartbeat("backup"))
	if err != nil {
		t.Fatal(err)
	}
	kick := make(chan struct{})
	state := make(chan string, 2)
	state <- bus.StateOK
	state <- bus.StateDegraded
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	h := &bus.Heartbeater{NC: nc, Subjects: subj, Session: "S", Service: "backup", Instance: "i-1",
		Clock: clockwork.NewFakeClock(), Kick: kick, Beat: func() (string, any) { return <-state, nil }}
	go func() { done <- h.Run(ctx) }()
	for i, want := range []string{bus.StateOK, bus.StateDegraded} {
		if i > 0 {
			kick <- struct{}{} // the fake clock never moves
		}
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("beat %d: %v", i+1, err)
		}
		var hb bus.Heartbeat
		if err := json.Unmarshal(m.Data, &hb); err != nil || hb.State != want {
			t.Fatalf("beat %d = %s (%v); want %s", i+1, m.Data, err, want)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
