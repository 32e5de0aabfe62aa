package gateway

import (
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
)

// Bounds of the memory of sent keys: relay retries a send for well under
// an hour (DefaultSendMaxAttempts, backoff to five minutes), so a day and
// ten thousand keys cover every retry of any send at SEND_RATE with room.
const (
	sentKeysMax = 10_000
	sentKeysFor = 24 * time.Hour
)

// sentKeys closes the double-send window of P.gateway.send as far as the
// gateway can. Relay asks with the send's idempotency key; when the gateway
// sent but relay (or the gateway's answer) died before relay recorded the
// outcome, River runs the job again and the same key arrives a second time.
// The gateway remembers, by key, the answer of every message it sent, and
// answers a repeat with it instead of sending again; a repeat that arrives
// while the first is still sending waits for it and shares its answer.
//
// Only sends that went out are remembered. A failed attempt is forgotten
// once its concurrent repeats have its answer: WhatsApp did not confirm it,
// and relay retries exactly the failures that sent nothing (not connected,
// shutting down), which must then try again.
//
// The memory is in this process only, bounded by sentKeysMax keys and
// sentKeysFor on the injected clock, oldest first: a gateway restart
// between a send and relay's commit is the window that remains.
type sentKeys struct {
	clock clockwork.Clock
	limit int
	ttl   time.Duration

	mu    sync.Mutex
	calls map[string]*sendCall
	order []*sendCall // remembered sends, oldest first
}

// sendCall is one key's send: done closes once rep is final.
type sendCall struct {
	key  string
	done chan struct{}
	rep  bus.MsgSendReply // written before done closes, read after
	at   time.Time        // when it was sent
	// repeats counts the requests that found it running (under mu):
	// tests see a repeat waiting.
	repeats int
}

// Whom begin makes responsible for a key.
const (
	callNew     = iota // the caller sends, then calls finish
	callRunning        // another request is sending it: wait for done
	callDone           // sent before: answer rep
)

func newSentKeys(clock clockwork.Clock, limit int, ttl time.Duration) *sentKeys {
	return &sentKeys{clock: clock, limit: limit, ttl: ttl, calls: map[string]*sendCall{}}
}

// begin looks key up. An empty key is never remembered: (nil, callNew).
func (s *sentKeys) begin(key string) (*sendCall, int) {
	if key == "" {
		return nil, callNew
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.evict()
	if c, ok := s.calls[key]; ok {
		select {
		case <-c.done:
			return c, callDone
		default:
			c.repeats++
			return c, callRunning
		}
	}
	c := &sendCall{key: key, done: make(chan struct{})}
	s.calls[key] = c
	return c, callNew
}

// finish gives c its answer and wakes its waiters; a sent message is
// remembered, a failure forgotten (see sentKeys). A nil c (no key) is a
// no-op.
func (s *sentKeys) finish(c *sendCall, rep bus.MsgSendReply) {
	if c == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c.rep = rep
	close(c.done)
	if !rep.OK {
		delete(s.calls, c.key)
		return
	}
	c.at = s.clock.Now()
	s.order = append(s.order, c)
	s.evict()
}

// evict forgets the oldest sends beyond the bounds. Under mu.
func (s *sentKeys) evict() {
	cutoff := s.clock.Now().Add(-s.ttl)
	n := 0
	for n < len(s.order) && (len(s.order)-n > s.limit || !s.order[n].at.After(cutoff)) {
		delete(s.calls, s.order[n].key)
		s.order[n] = nil // no pointer kept alive by the backing array
		n++
	}
	s.order = s.order[n:]
}

// len is how many sends are remembered (tests).
func (s *sentKeys) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.order)
}

// repeatsOf is how many repeats found key's send running (tests).
func (s *sentKeys) repeatsOf(key string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.calls[key]; ok {
		return c.repeats
	}
	return 0
}
