// Package relay makes delivery at-least-once between WhatsApp and the bot,
// and sends durable (issue 11). The gateway hands every incoming message and
// receipt to relay with a P.relay.store request and acknowledges it to
// WhatsApp only after relay answers ok; relay answers once the item and its
// delivery jobs are committed in one transaction. River jobs then deliver
// each item: on P.msg.in (into the session's JetStream stream when the
// server has JetStream) and to the webhook. Sends (P.msg.send) are rows keyed
// by their idempotency key and River jobs paced by SEND_RATE that ask the
// gateway to send (P.gateway.send); the outcome is written in the
// transaction that completes the job.
//
// # Order
//
// Each item's deliveries are River jobs in lanes: queues per channel (4
// for NATS, 16 for the webhook, whose receiver may stall), each worked by
// one worker, with every chat hashed to one lane of each. A lane runs its jobs one at a time in River's fetch order
// (scheduled_at, then id), and a job's scheduled_at is read after its seq
// was taken, under the seq lock, so within a chat jobs run in seq order. A
// job that fails is retried later with exponential backoff while the lane
// goes on with the next jobs: order holds while nothing fails, and a failing
// or dead delivery never blocks its chat.
//
// # Guarantees and the one window
//
// An item is acknowledged to WhatsApp only after its row and jobs are
// committed, so an incoming message is lost only if the database loses a
// commit. Deliveries are at least once: a job that delivered but crashed
// before River recorded its completion delivers again (same seq, same
// Nats-Msg-Id, same X-Blacksky-Delivery). A send goes out once per
// idempotency key. When the gateway sent the message but relay died (or the
// gateway's answer was lost) before the transaction that records the
// outcome and completes the job committed, River runs the job again and
// asks the gateway with the same idempotency key; the gateway remembers the
// keys it sent (in memory, bounded) and answers the repeat without sending.
// The one window left: the gateway restarts between the send and the
// commit.
package relay

import (
	"context"
	"errors"
	"time"
)

// Item kinds a delivery job carries.
const (
	ItemMessage = "msg"     // Ref is the seq
	ItemReceipt = "receipt" // Ref is the receipt's row id
	ItemSend    = "send"    // Key is the idempotency key: P.msg.sent or P.msg.send_failed
	ItemConn    = "conn"    // Event holds the P.conn.<kind> event itself
)

// Send states.
const (
	SendQueued = "queued"
	SendSent   = "sent"
	SendFailed = "failed"
)

// ErrNotFound is a message, receipt or send that is not stored (never, or
// pruned).
var ErrNotFound = errors.New("not found")

// Stored is one stored message or receipt. Payload is the encoded JSON
// (see Codec).
type Stored struct {
	Ref        int64 // seq of a message, row id of a receipt
	Chat       string
	ReceivedAt time.Time
	Payload    []byte
}

// NewMessage is a message to store; the store assigns its seq.
type NewMessage struct {
	Session    string
	Chat       string
	WAID       string
	ReceivedAt time.Time
	Payload    []byte
}

// NewReceipt is a receipt to store; Dedup identifies it across redeliveries.
type NewReceipt struct {
	Session    string
	Dedup      string
	Chat       string
	ReceivedAt time.Time
	Payload    []byte
}

// Send is one send, by idempotency key.
type Send struct {
	Key       string
	State     string // SendQueued, SendSent or SendFailed
	CreatedAt time.Time
	Payload   []byte // encoded bus.MsgSend
	Outcome   Outcome
}

// Outcome is a send's result.
type Outcome struct {
	State      string // SendSent or SendFailed
	WAID       string
	SentAt     time.Time
	Error      string
	FinishedAt time.Time
}

// JobCount is how many relay jobs of one kind are in one River state.
type JobCount struct {
	Kind, State string
	Count       int64
	OldestMS    int64 // creation time of the oldest, unix ms
}

// Stats feed relay's heartbeat.
type Stats struct {
	LastSeq     int64
	Stored      int64
	QueuedSends int64
	Jobs        []JobCount
}

// Store keeps relay's rows. Implementations: postgres and sqlite, both
// checked by the storetest suite.
type Store interface {
	// Kind is "postgres" or "sqlite".
	Kind() string
	// Migrate creates or upgrades relay's tables and River's; idempotent.
	Migrate(ctx context.Context) error
	Ping(ctx context.Context) error
	Close()

	// InsertMessage stores m with the session's next seq and runs hook in
	// the same transaction. A message already stored (same session, chat
	// and WhatsApp id) is not stored again: its seq is returned with dup
	// true and hook does not run.
	InsertMessage(ctx context.Context, m NewMessage, hook RefInTx) (seq int64, dup bool, err error)
	// Message reads one message by seq.
	Message(ctx context.Context, session string, seq int64) (Stored, error)
	// Messages reads up to limit messages after seq, in seq order.
	Messages(ctx context.Context, session string, afterSeq int64, limit int) ([]Stored, error)
	// InsertReceipt is InsertMessage for receipts (no seq: the row id).
	InsertReceipt(ctx context.Context, r NewReceipt, hook RefInTx) (id int64, dup bool, err error)
	Receipt(ctx context.Context, session string, id int64) (Stored, error)

	// InsertSend queues a send unless its key is known, running hook in the
	// same transaction when it is new. It returns the send as stored (the
	// first one for a known key) and whether it was inserted now.
	InsertSend(ctx context.Context, session, key string, createdAt time.Time, payload []byte, hook InTx) (Send, bool, error)
	GetSend(ctx context.Context, session, key string) (Send, error)
	// FinishSend records the outcome of a queued send and runs hook in the
	// same transaction; changed is false (and hook does not run) when the
	// send was no longer queued.
	FinishSend(ctx context.Context, session, key string, o Outcome, hook InTx) (changed bool, err error)
	CountQueuedSends(ctx context.Context, session string) (int64, error)
	// QueuedSendKeys lists the keys of the session's queued sends, oldest
	// first (at most Config.MaxQueuedSends and a few).
	QueuedSendKeys(ctx context.Context, session string) ([]string, error)

	// Prune deletes messages and receipts received before cutoff and sends
	// finished before it.
	Prune(ctx context.Context, session string, cutoff time.Time) (int64, error)
	Stats(ctx context.Context, session string) (Stats, error)

	// NewQueue builds relay's River client on this database (River.NewQueue);
	// the Tx of the store's transactions inserts jobs through it.
	NewQueue(cfg QueueConfig) (Queue, error)
}

// FillSend sets a send's times from the unix milliseconds stores keep
// (zero: unset). Stores call it.
func FillSend(sd Send, created, sent, finished int64) Send {
	sd.CreatedAt = time.UnixMilli(created).UTC()
	if sd.State != SendQueued {
		sd.Outcome.State = sd.State
	}
	if sent != 0 {
		sd.Outcome.SentAt = time.UnixMilli(sent).UTC()
	}
	if finished != 0 {
		sd.Outcome.FinishedAt = time.UnixMilli(finished).UTC()
	}
	return sd
}

// UnixMilli is t in unix milliseconds, 0 for the zero time.
func UnixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}
