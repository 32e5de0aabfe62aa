package gateway

import (
	"encoding/json"
	"sync"

	"go.mau.fi/whatsmeow/types/events"
)

// maxQueuedMessages bounds the messages waiting for the loop (an offline
// backlog arrives in bursts). Connection events are never dropped: they are
// few and the state machine depends on every one of them.
const maxQueuedMessages = 10000

// queue hands whatsmeow events to the supervisor loop. whatsmeow calls
// handlers synchronously on its own goroutines, so push never blocks.
type queue struct {
	mu       sync.Mutex
	items    []any
	messages int
	dropped  int
	signal   chan struct{}
}

func newQueue() *queue { return &queue{signal: make(chan struct{}, 1)} }

func (q *queue) push(evt any) {
	q.mu.Lock()
	if _, isMsg := evt.(*events.Message); isMsg {
		if q.messages >= maxQueuedMessages {
			q.dropped++
			q.mu.Unlock()
			return
		}
		q.messages++
	}
	q.items = append(q.items, evt)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// ready fires when events may be waiting.
func (q *queue) ready() <-chan struct{} { return q.signal }

// drain takes every waiting event, and how many messages were dropped since
// the last drain.
func (q *queue) drain() ([]any, int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	items, dropped := q.items, q.dropped
	q.items, q.messages, q.dropped = nil, 0, 0
	return items, dropped
}

func jsonUnmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
