package gateway

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/time/rate"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// SEND_RATE "N per period" lets at most N+1 sends through in any window of
// one period (and not much fewer).
func TestSendRateWindow(t *testing.T) {
	tests := []struct {
		name   string
		n      int
		per    time.Duration
		step   time.Duration
		rounds int
	}{
		{"20/m, a request every second for 3 minutes", 20, time.Minute, time.Second, 180},
		{"3/s, a request every 50ms for 5 seconds", 3, time.Second, 50 * time.Millisecond, 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, func(c *Config, _ *fakeConn) {
				c.SendRate = rate.Limit(float64(tt.n) / tt.per.Seconds())
				c.SendWait = time.Nanosecond // refuse rather than wait: one request at a time
			})
			h.connected()
			var okAt []time.Time
			for range tt.rounds {
				r := h.request(`{"to":"15551234567","text":"x"}`)
				switch {
				case r.OK:
					okAt = append(okAt, h.clock.Now())
				case !strings.Contains(r.Error, "rate limited: next send slot in"):
					t.Fatalf("reply = %+v", r)
				}
				h.advance(tt.step)
			}
			for i, from := range okAt {
				in := 0
				for _, at := range okAt[i:] {
					if !at.After(from.Add(tt.per)) {
						in++
					}
				}
				if in > tt.n+1 {
					t.Fatalf("%d sends within %s of %s, want at most %d", in, tt.per, from.Sub(t0), tt.n+1)
				}
			}
			if want := tt.n * tt.rounds * int(tt.step) / int(tt.per); len(okAt) < want {
				t.Fatalf("%d sends in all, want at least %d", len(okAt), want)
			}
		})
	}
}

// A send whose slot is within SendWait waits for it on the clock; a later
// slot is refused at once with the wait, and the refusal does not hold the
// slot.
func TestSendWaitsForItsSlot(t *testing.T) {
	tests := []struct {
		name  string
		every time.Duration // one slot per
		wait  bool
	}{
		{"slot 4s away: waits", 4 * time.Second, true},
		{"slot 60s away: refused", time.Minute, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = rate.Every(tt.every) })
			h.connected()
			if r := h.request(`{"to":"15551234567","text":"first"}`); !r.OK {
				t.Fatalf("first send: %+v", r)
			}
			replies := h.requestAsync(`{"to":"15551234567","text":"second"}`)
			if !tt.wait {
				r := h.reply(replies)
				if r.OK || !strings.Contains(r.Error, "rate limited: next send slot in 60s") {
					t.Fatalf("reply = %+v", r)
				}
				h.advance(tt.every)
				if r := h.request(`{"to":"15551234567","text":"third"}`); !r.OK {
					t.Fatalf("send once the slot came: %+v", r)
				}
				return
			}
			testwait.For(t, 5*time.Second, "the send to wait for its slot", func() bool { return h.gw.waiters.Load() == 1 })
			h.advance(tt.every - time.Millisecond)
			select {
			case r := <-replies:
				t.Fatalf("answered before its slot: %+v", r)
			default:
			}
			var r bus.MsgSendReply
			h.advanceUntil(time.Millisecond, "the reply", func() bool {
				select {
				case r = <-replies:
					return true
				default:
					return false
				}
			})
			if !r.OK {
				t.Fatalf("reply = %+v", r)
			}
			if n := len(h.conn.sentMsgs()); n != 2 {
				t.Fatalf("sent %d, want 2", n)
			}
		})
	}
}

// At most MaxSendWaiters sends wait for a slot; one more is refused.
func TestSendWaitersBounded(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = 100 })
	h.connected()
	if r := h.request(`{"to":"15551234567","text":"first"}`); !r.OK {
		t.Fatalf("first send: %+v", r)
	}
	inbox := h.nc.NewRespInbox()
	answers := make(chan *nats.Msg, MaxSendWaiters)
	sub, err := h.nc.ChanSubscribe(inbox, answers)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	for range MaxSendWaiters {
		if err := h.nc.PublishRequest(h.subj.MsgSend(), inbox, []byte(`{"to":"15551234567","text":"w"}`)); err != nil {
			t.Fatal(err)
		}
	}
	testwait.For(t, 5*time.Second, "all sends waiting", func() bool { return h.gw.waiters.Load() == MaxSendWaiters })
	if r := h.request(`{"to":"15551234567","text":"one too many"}`); r.OK || !strings.Contains(r.Error, "already waiting") {
		t.Fatalf("reply = %+v", r)
	}
	got := 0
	h.advanceUntil(100*time.Millisecond, "every waiting send answered", func() bool {
		for {
			select {
			case m := <-answers:
				if !strings.Contains(string(m.Data), `"ok":true`) {
					t.Fatalf("waiting send answered %s", m.Data)
				}
				got++
			default:
				return got == MaxSendWaiters
			}
		}
	})
	if n := len(h.conn.sentMsgs()); n != MaxSendWaiters+1 {
		t.Fatalf("sent %d, want %d", n, MaxSendWaiters+1)
	}
}

// Owner replies take their slots from the same limiter as msg.send.
func TestOwnerRepliesShareTheLimiter(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.SendRate = rate.Every(10 * time.Second) })
	h.connected()
	h.conn.emit(ownerMsg("p1", ".ping", false))
	h.replies(1)
	if r := h.request(`{"to":"15551234567","text":"x"}`); r.OK || !strings.Contains(r.Error, "rate limited") {
		t.Fatalf("msg.send right after an owner reply: %+v", r)
	}
	// A second owner command waits for its slot, at t0+10s (OwnerSendWait).
	h.conn.emit(ownerMsg("p2", ".ping", false))
	h.probe()
	h.advance(10*time.Second - time.Millisecond)
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("sent %d before the slot, want 1", n)
	}
	h.advanceUntil(time.Millisecond, "the second owner reply", func() bool { return len(h.conn.sentMsgs()) == 2 })
}
