package sandbox_test

import (
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// gatewayBeats keeps the gateway's latest heartbeat details.
type gatewayBeats struct {
	mu   sync.Mutex
	last bus.GatewayDetails
}

func watchGatewayBeats(t *testing.T, r *rig) *gatewayBeats {
	t.Helper()
	b := &gatewayBeats{}
	sub, err := r.nc.Subscribe(r.subj.Heartbeat(bus.ServiceGateway), func(m *nats.Msg) {
		var hb bus.Heartbeat
		var d bus.GatewayDetails
		if json.Unmarshal(m.Data, &hb) == nil && json.Unmarshal(hb.Details, &d) == nil {
			b.mu.Lock()
			b.last = d
			b.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := r.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return b
}

// until steps the clock a heartbeat at a time until the gateway's
// heartbeat satisfies cond.
func (b *gatewayBeats) until(r *rig, what string, cond func(bus.GatewayDetails) bool) {
	r.t.Helper()
	r.advanceUntil(bus.HeartbeatInterval, what, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return cond(b.last)
	})
}

// relayOff takes relay away, injects n messages and waits until the
// gateway has left every one unacknowledged.
func relayOff(t *testing.T, r *rig, beats *gatewayBeats, from string, n int) []string {
	t.Helper()
	r.relay.Off()
	var before int64
	beats.mu.Lock()
	before = beats.last.RelayUnacked
	beats.mu.Unlock()
	ids := r.inject(sandbox.Inject{From: from, Content: sandbox.Content{Text: "while relay is down"}, Count: n})
	beats.until(r, "the messages left unacknowledged", func(d bus.GatewayDetails) bool {
		return d.RelayUnacked == before+int64(n)
	})
	for _, id := range ids {
		if got, acked, err := r.srv.Deliveries(t.Context(), id); err != nil || got != 1 || acked {
			t.Fatalf("%s: %d deliveries, acked %v (%v); want 1, not acked", id, got, acked, err)
		}
	}
	return ids
}

// storedOnce waits until every id is acknowledged and checks relay stored
// each exactly once.
func storedOnce(t *testing.T, r *rig, ids []string) {
	t.Helper()
	for _, id := range ids {
		testwait.For(t, 10*time.Second, "the redelivery of "+id+" acknowledged", func() bool {
			_, acked, err := r.srv.Deliveries(t.Context(), id)
			return err == nil && acked
		})
	}
	seen := map[string]int{}
	for _, m := range r.relay.Messages() {
		seen[m.ID]++
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Fatalf("relay stored %s %d times, want once", id, seen[id])
		}
	}
}

// Messages refused while relay was down come as soon as relay is back:
// the gateway reconnects once (its first heartbeat says so), WhatsApp
// redelivers, relay stores each once. A second outage within the minute
// does not reconnect again before the minute is over; then it does, once.
func TestMessagesRefusedWhileRelayWasDownComeWhenItIsBack(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	beats := watchGatewayBeats(t, r)

	ids := relayOff(t, r, beats, "15551230100", 3)
	r.rec.none(t)
	first := r.clock.Now()
	if err := r.relay.On(); err != nil {
		t.Fatal(err)
	}
	if e := r.rec.next(t, bus.ConnReconnecting); !e.At.Equal(first) {
		t.Fatalf("redelivery reconnect at %v, want at once (%v)", e.At, first)
	}
	r.advanceUntil(500*time.Millisecond, "the reconnect", func() bool { return r.rec.ahead() > 0 })
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnConnected)
	storedOnce(t, r, ids)
	beats.until(r, "one redelivery reconnect", func(d bus.GatewayDetails) bool {
		return d.RelayRedeliveryReconnects == 1 && d.WAState == bus.StateConnected
	})

	// Relay flaps again within the minute.
	more := relayOff(t, r, beats, "15551230101", 2)
	if err := r.relay.On(); err != nil {
		t.Fatal(err)
	}
	r.advanceUntil(time.Second, "the next reconnect", func() bool { return r.rec.ahead() > 0 })
	if e := r.rec.next(t, bus.ConnReconnecting); e.At.Before(first.Add(gateway.RedeliverEvery)) {
		t.Fatalf("second redelivery reconnect at %v, within the minute of the first (%v)", e.At, first)
	}
	r.advanceUntil(500*time.Millisecond, "the reconnect", func() bool { return r.rec.ahead() > 0 })
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnConnected)
	storedOnce(t, r, append(ids, more...))
	beats.until(r, "two redelivery reconnects", func(d bus.GatewayDetails) bool {
		return d.RelayRedeliveryReconnects == 2 && d.Reconnects == 0
	})
}
