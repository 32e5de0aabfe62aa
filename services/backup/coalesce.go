package backup

import "sync"

// coalescer decides which snapshot covers which request.
//
// Every snapshot run takes a read number (1, 2, ...) just before it reads the
// store. A request that arrives when reads == n is covered by the first run
// with a read number above n: that run reads the store after the request came.
// All requests arriving before the next read share one job (gen n), so a burst
// costs one snapshot, plus at most one more for requests that came while the
// first was already reading. Runs are serialised, so read numbers end in order.
//
// The reason does not matter: a run covers every request that came before it
// read the store, so requests naming different reasons share one job (the
// first one's reason is recorded). Otherwise each new reason would cost a
// full snapshot and could queue the shutdown snapshot behind them.
type coalescer struct {
	mu    sync.Mutex
	reads int64
	// queued[anyReason] is the gen of a job enqueued and not yet read; the
	// map (cleared when the queue changes) holds that one key only.
	queued  map[string]int64
	waiters []*Wait
}

func newCoalescer() *coalescer {
	return &coalescer{queued: map[string]int64{}}
}

// anyReason keys the pending job whatever the reason of its requests.
const anyReason = ""

// add registers a request. w is nil when no reply is wanted. enqueue tells
// the caller to insert a job for gen (with this reason): none is pending yet.
func (c *coalescer) add(_ string, wantReply bool) (w *Wait, gen int64, enqueue bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	gen = c.reads
	if wantReply {
		w = &Wait{after: gen, ch: make(chan Outcome, 1)}
		w.cancel = func() { c.remove(w) }
		c.waiters = append(c.waiters, w)
	}
	if g, ok := c.queued[anyReason]; !ok || g != gen {
		c.queued[anyReason] = gen
		enqueue = true
	}
	return w, gen, enqueue
}

// beginRead is called by a run just before it reads the store.
func (c *coalescer) beginRead() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reads++
	return c.reads
}

// finish answers every request covered by run n.
func (c *coalescer) finish(n int64, o Outcome) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resolveLocked(func(w *Wait) bool { return w.after < n }, o)
}

// remove forgets a waiter that gave up (timeout or shutdown).
func (c *coalescer) remove(w *Wait) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.waiters {
		if x == w {
			c.waiters = append(c.waiters[:i], c.waiters[i+1:]...)
			return
		}
	}
}

func (c *coalescer) resolveLocked(match func(*Wait) bool, o Outcome) {
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if match(w) {
			w.ch <- o
		} else {
			kept = append(kept, w)
		}
	}
	clear(c.waiters[len(kept):])
	c.waiters = kept
}

// requeue forgets the queued job: its queue is gone.
func (c *coalescer) requeue() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.queued)
}
