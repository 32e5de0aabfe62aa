package gateway

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// Backup holds P.session.restore open while another instance has the
// lease: a request that times out (on the injected clock) is asked again at
// once, and refusals back off at most RestoreMaxBackoff even when
// RECONNECT_MAX is long, so the instance starts soon after the lease frees.
func TestRestoreHandshakeStandby(t *testing.T) {
	tests := []struct {
		name     string
		refuse   bool          // answer ok:false; otherwise hold the request unanswered
		step     time.Duration // clock advanced after each unsuccessful request
		requests int           // the last one is answered ok
	}{
		{"held requests are asked again at once", false, DefaultRestoreTimeout, 4},
		{"refusals back off at most 5s", true, RestoreMaxBackoff, 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, func(c *Config, _ *fakeConn) {
				c.BackupEnabled = true
				c.ReconnectMax = 5 * time.Minute
			})
			reqs := make(chan *nats.Msg, 64)
			sub, err := h.nc.ChanSubscribe(h.subj.SessionRestoreFor(testUnit), reqs)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Unsubscribe()
			if err := h.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			// A request sent before the subscription found no responders:
			// step the clock until one arrives.
			var m *nats.Msg
			testwait.For(t, 10*time.Second, "a restore request", func() bool {
				select {
				case m = <-reqs:
					return true
				default:
					h.advance(100 * time.Millisecond)
					return false
				}
			})
			failures := h.gw.attempt()
			for i := 1; i < tt.requests; i++ {
				if tt.refuse {
					if err := bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: false, Error: "lease held by another instance"}); err != nil {
						t.Fatal(err)
					}
					// The backoff timer is armed once the attempt is counted.
					failures++
					testwait.For(t, 5*time.Second, "the refusal to be counted", func() bool { return h.gw.attempt() == failures })
					ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
					if err := h.clock.BlockUntilContext(ctx, 2); err != nil { // heartbeat ticker and backoff timer
						t.Fatal("no backoff timer armed")
					}
					cancel()
				}
				h.advance(tt.step)
				select {
				case m = <-reqs:
				case <-time.After(5 * time.Second):
					t.Fatalf("no restore request %d after %s", i+1, tt.step)
				}
				if len(h.opens) != 0 {
					t.Fatal("store opened before the restore was answered")
				}
			}
			if err := bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Restored: true, Source: bus.SourceDatabase}); err != nil {
				t.Fatal(err)
			}
			select {
			case <-h.opens:
			case <-time.After(5 * time.Second):
				t.Fatal("store not opened after the restore answer")
			}
			if n := len(reqs); n != 0 {
				t.Fatalf("%d extra restore requests", n)
			}
		})
	}
}
