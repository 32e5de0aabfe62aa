package gateway

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// Relay paces the bots' sends by SEND_RATE: a send it releases on
// P.gateway.send goes out at once, however tight the gateway's own limiter.
func TestRelaySendsAreNotHeldByTheLimiter(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = rate.Every(time.Minute) })
	h.connected()
	for i := range 5 {
		if r := h.request(fmt.Sprintf(`{"to":"15551234567","text":"n%d"}`, i)); !r.OK {
			t.Fatalf("send %d: %+v", i, r)
		}
	}
	if n := len(h.conn.sentMsgs()); n != 5 {
		t.Fatalf("sent %d, want 5", n)
	}
}

// Owner replies take their slots from the limiter, and relay's sends count
// in it: an owner reply right after a relay send waits for the next slot
// instead of doubling the rate.
func TestOwnerRepliesQueueBehindRelaySends(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = rate.Every(10 * time.Second) })
	h.connected()
	if r := h.request(`{"to":"15551234567","text":"x"}`); !r.OK {
		t.Fatalf("relay send: %+v", r)
	}
	h.conn.emit(ownerMsg("p1", ".ping", false))
	h.probe()
	h.advance(10*time.Second - time.Millisecond)
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("sent %d before the slot, want 1", n)
	}
	h.advanceUntil(time.Millisecond, "the owner reply", func() bool { return len(h.conn.sentMsgs()) == 2 })
}

// Owner replies share the limiter among themselves: a second one waits for
// its slot (within OwnerSendWait).
func TestOwnerRepliesShareTheLimiter(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = rate.Every(10 * time.Second) })
	h.connected()
	h.conn.emit(ownerMsg("p1", ".ping", false))
	h.replies(1)
	h.conn.emit(ownerMsg("p2", ".ping", false))
	h.probe()
	h.advance(10*time.Second - time.Millisecond)
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("sent %d before the slot, want 1", n)
	}
	h.advanceUntil(time.Millisecond, "the second owner reply", func() bool { return len(h.conn.sentMsgs()) == 2 })
}
