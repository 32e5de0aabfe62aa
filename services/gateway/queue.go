package gateway

import (
	"encoding/json"
	"sync"
)

// queue hands whatsmeow's connection events to the supervisor loop.
// whatsmeow calls handlers synchronously on its own goroutines, so push
// never blocks. Nothing is dropped: connection events are few and the state
// machine depends on every one of them (messages never come here; they are
// published from the handler).
type queue struct {
	mu     sync.Mutex
	items  []any
	signal chan struct{}
}

func newQueue() *queue { return &queue{signal: make(chan struct{}, 1)} }

func (q *queue) push(evt any) {
	q.mu.Lock()
	q.items = append(q.items, evt)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// ready fires when events may be waiting.
func (q *queue) ready() <-chan struct{} { return q.signal }

// drain takes every waiting event.
func (q *queue) drain() []any {
	q.mu.Lock()
	defer q.mu.Unlock()
	items := q.items
	q.items = nil
	return items
}

func jsonUnmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
