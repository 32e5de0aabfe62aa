package gateway

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// A key relay asks for again (its commit died after the gateway sent) is
// not sent a second time: the repeat gets the first answer, same id and
// timestamp. Other keys, and requests without one, are sent as usual.
func TestRepeatedSendKeyIsSentOnceAndAnsweredTheSame(t *testing.T) {
	h := start(t)
	h.connected()
	first := h.request(`{"to":"15551234567","text":"hello","idempotency_key":"k1"}`)
	if !first.OK || first.ID == "" || first.Timestamp == nil {
		t.Fatalf("first send: %+v", first)
	}
	again := h.request(`{"to":"15551234567","text":"hello","idempotency_key":"k1"}`)
	if !again.OK || again.ID != first.ID || again.Timestamp == nil || !again.Timestamp.Equal(*first.Timestamp) {
		t.Fatalf("repeat answered %+v, want the first answer %+v", again, first)
	}
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("%d messages sent for one key, want 1", n)
	}
	other := h.request(`{"to":"15551234567","text":"hello","idempotency_key":"k2"}`)
	if !other.OK || other.ID == first.ID {
		t.Fatalf("another key: %+v", other)
	}
	for range 2 {
		if r := h.request(`{"to":"15551234567","text":"no key"}`); !r.OK {
			t.Fatalf("send without a key: %+v", r)
		}
	}
	if n := len(h.conn.sentMsgs()); n != 4 {
		t.Fatalf("%d messages sent, want 4 (k1 once, k2, two without a key)", n)
	}
}

// Repeats that arrive while the first request of their key is still
// sending wait for it and share its answer; WhatsApp sees one message.
func TestConcurrentRepeatsOfASendKeyWaitForTheFirst(t *testing.T) {
	h := start(t)
	h.connected()
	h.conn.mu.Lock()
	h.conn.sendStarted, h.conn.sendRelease = make(chan struct{}, 4), make(chan struct{})
	h.conn.mu.Unlock()
	const body = `{"to":"15551234567","text":"slow","idempotency_key":"slow-1"}`
	replies := []<-chan bus.MsgSendReply{h.requestAsync(body)}
	select {
	case <-h.conn.sendStarted:
	case <-time.After(5 * time.Second):
		t.Fatal("first send never started")
	}
	replies = append(replies, h.requestAsync(body), h.requestAsync(body))
	testwait.For(t, 5*time.Second, "both repeats waiting on the first send", func() bool {
		return h.gw.sent.repeatsOf("slow-1") == 2
	})
	close(h.conn.sendRelease)
	var got []bus.MsgSendReply
	for _, ch := range replies {
		got = append(got, h.reply(ch))
	}
	for i, r := range got {
		if !r.OK || r.ID != got[0].ID || r.ID == "" {
			t.Fatalf("reply %d = %+v, want the first send's %+v", i, r, got[0])
		}
	}
	select {
	case <-h.conn.sendStarted:
		t.Fatal("a repeat started a second send")
	default:
	}
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("%d messages sent, want 1", n)
	}
}

// A failed attempt is not remembered: WhatsApp did not confirm it, and
// relay retries exactly the failures that sent nothing, so the retry of
// the same key must try again.
func TestFailedSendKeyIsTriedAgain(t *testing.T) {
	h := start(t, func(_ *Config, c *fakeConn) { c.sendErr = errors.New("websocket not connected") })
	h.connected()
	const body = `{"to":"15551234567","text":"retry me","idempotency_key":"k-fail"}`
	if r := h.request(body); r.OK {
		t.Fatalf("failing send answered %+v", r)
	}
	h.conn.mu.Lock()
	h.conn.sendErr = nil
	h.conn.mu.Unlock()
	if r := h.request(body); !r.OK || r.ID == "" {
		t.Fatalf("retry after a failure: %+v", r)
	}
	if n := len(h.conn.sentMsgs()); n != 1 {
		t.Fatalf("%d messages sent, want 1", n)
	}
}

// The memory is bounded: beyond its count the oldest key is forgotten,
// and every key after its time on the injected clock.
func TestSentKeysForgetTheOldestBeyondTheBounds(t *testing.T) {
	clock := clockwork.NewFakeClockAt(t0)
	s := newSentKeys(clock, 3, time.Hour)
	sent := func(key string) {
		t.Helper()
		c, state := s.begin(key)
		if state != callNew {
			t.Fatalf("begin(%s) = %d, want a new send", key, state)
		}
		s.finish(c, bus.MsgSendReply{OK: true, ID: "id-" + key})
	}
	for i := range 4 {
		sent(fmt.Sprint("k", i))
		clock.Advance(time.Minute)
	}
	if n := s.len(); n != 3 {
		t.Fatalf("%d keys remembered, want the bound 3", n)
	}
	if _, state := s.begin("k0"); state != callNew {
		t.Fatalf("the oldest key beyond the count is still remembered (state %d)", state)
	}
	for _, k := range []string{"k2", "k3"} {
		if c, state := s.begin(k); state != callDone || c.rep.ID != "id-"+k {
			t.Fatalf("begin(%s) = %d %+v, want its remembered answer", k, state, c)
		}
	}
	clock.Advance(time.Hour)
	if _, state := s.begin("k3"); state != callNew {
		t.Fatalf("a key older than the time bound is still remembered (state %d)", state)
	}
	if c, state := s.begin(""); c != nil || state != callNew {
		t.Fatal("an empty key was remembered")
	}
}

// BenchmarkSentKeysAtTheBound: one new key sent and remembered while the
// memory is full, so every send also evicts the oldest.
func BenchmarkSentKeysAtTheBound(b *testing.B) {
	clock := clockwork.NewFakeClockAt(t0)
	s := newSentKeys(clock, sentKeysMax, sentKeysFor)
	ok := bus.MsgSendReply{OK: true, ID: "3EB0"}
	for i := range sentKeysMax {
		c, _ := s.begin(fmt.Sprint("warm-", i))
		s.finish(c, ok)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c, _ := s.begin(fmt.Sprint("k-", i))
		s.finish(c, ok)
		i++
	}
}
