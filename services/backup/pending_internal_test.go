package backup

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// Nit: a gateway retrying P.session.restore while the restore runs costs a
// bounded list entry, not a goroutine per request; all are answered once
// ready.
func TestRestoreRequestsWaitBounded(t *testing.T) {
	cfg := Config{SessionID: "s", DataDir: t.TempDir()}
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := srv.Connect("t", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	s, err := New(Options{Config: cfg, NC: nc, Open: func(context.Context) (Store, error) { return nil, nil }})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		requests    int
		wantPending int
	}{
		{"few", 3, 3},
		{"a retry storm", 200, maxPendingRestore},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s.epoch = &epochState{}
			for range tc.requests {
				s.onRestore(&nats.Msg{Subject: "x", Reply: "inbox"})
			}
			if got := len(s.epoch.pending); got != tc.wantPending {
				t.Fatalf("pending = %d; want %d", got, tc.wantPending)
			}
			s.markReady(bus.RestoreReply{OK: true})
			if len(s.epoch.pending) != 0 || !s.epoch.done {
				t.Fatalf("after ready: %+v", s.epoch)
			}
		})
	}
}
