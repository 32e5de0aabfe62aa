package bus

import (
	"bytes"
	"errors"
	"fmt"
	"time"
)

// Relay's subjects and payloads (issue 11: at-least-once delivery). The
// gateway no longer publishes P.msg.in itself: it hands every incoming
// message and receipt to relay with a P.relay.store request and reports
// success to whatsmeow (which then sends WhatsApp's receipt) only when relay
// answers ok, after its commit. Relay owns everything a bot sees of
// messages: P.msg.in (with seq), P.msg.receipt, P.msg.sent,
// P.msg.send_failed, and answers P.msg.send, P.msg.replay and
// P.relay.retry. It sends through the gateway with P.gateway.send, which
// only our services may publish or hear.

// ServiceRelay is relay's heartbeat service name and role.
const ServiceRelay = "relay"

// RelayStore is the subject the gateway asks relay to store on.
func (s Subjects) RelayStore() string { return s.Prefix + ".relay.store" }

// RelayRetry asks relay to send dead deliveries again (blacksky deliveries
// retry).
func (s Subjects) RelayRetry() string { return s.Prefix + ".relay.retry" }

// MsgReplay is P.msg.replay: stored messages after a seq.
func (s Subjects) MsgReplay() string { return s.Prefix + ".msg.replay" }

// MsgReceipt is P.msg.receipt: delivery and read receipts from WhatsApp.
func (s Subjects) MsgReceipt() string { return s.Prefix + ".msg.receipt" }

// MsgSent is P.msg.sent: a queued send went out.
func (s Subjects) MsgSent() string { return s.Prefix + ".msg.sent" }

// MsgSendFailed is P.msg.send_failed: a queued send was refused for good.
func (s Subjects) MsgSendFailed() string { return s.Prefix + ".msg.send_failed" }

// GatewaySend is relay's request to the gateway to send one message now.
// Its body is a MsgSend, its answer a MsgSendReply.
func (s Subjects) GatewaySend() string { return s.Prefix + ".gateway.send" }

// RelayStoreRequest is a P.relay.store body: exactly one of Message and
// Receipt.
type RelayStoreRequest struct {
	Message *MsgIn   `json:"message,omitempty"`
	Receipt *Receipt `json:"receipt,omitempty"`
}

// RelayStoreReply answers P.relay.store once the item is committed (OK), or
// says why it is not (the gateway then reports failure and WhatsApp
// redelivers). Duplicate is a message relay already had (a redelivery).
type RelayStoreReply struct {
	OK        bool   `json:"ok"`
	Seq       int64  `json:"seq,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Receipt is P.msg.receipt: WhatsApp says messages were delivered, read or
// played.
type Receipt struct {
	Event
	Chat   string   `json:"chat"`
	Sender string   `json:"sender"`
	IDs    []string `json:"ids"`
	// Type is "delivered", "read", "read_self", "played", "sender",
	// "retry", ... (whatsmeow's ReceiptType, "delivered" for its empty one).
	Type      string    `json:"type"`
	Timestamp time.Time `json:"timestamp"`
}

// MsgReplayRequest is a P.msg.replay body.
type MsgReplayRequest struct {
	AfterSeq int64 `json:"after_seq"`
	Limit    int   `json:"limit,omitempty"`
}

// MsgReplayReply answers P.msg.replay: messages in seq order, each shaped
// as on P.msg.in.
type MsgReplayReply struct {
	OK       bool    `json:"ok"`
	Messages []MsgIn `json:"messages"`
	Error    string  `json:"error,omitempty"`
}

// MsgSendOutcome is P.msg.sent and P.msg.send_failed.
type MsgSendOutcome struct {
	Event
	IdempotencyKey string     `json:"idempotency_key"`
	To             string     `json:"to"`
	ID             string     `json:"id,omitempty"`
	Timestamp      *time.Time `json:"timestamp,omitempty"`
	Error          string     `json:"error,omitempty"`
}

// RelayDetails are relay's heartbeat details (P.heartbeat.relay); health
// shows them on /status and /metrics.
type RelayDetails struct {
	Database   string `json:"database"` // "postgres" or "sqlite"
	DatabaseOK bool   `json:"database_ok"`
	// LastSeq is the newest stored message's seq; Stored how many messages
	// are kept (MESSAGE_RETENTION).
	LastSeq int64 `json:"last_seq"`
	Stored  int64 `json:"stored"`
	// Deliveries not yet made (NATS, JetStream, webhook), and the dead ones
	// (retries exhausted or refused: blacksky deliveries retry).
	PendingDeliveries int64 `json:"pending_deliveries"`
	DeadDeliveries    int64 `json:"dead_deliveries"`
	// QueuedSends waits for its SEND_RATE slot or for the gateway.
	QueuedSends int64 `json:"queued_sends"`
	JetStream   bool  `json:"jetstream"`
	Webhook     bool  `json:"webhook"`
	// Oldest undelivered item's age, for the lag gauge.
	OldestPendingMS int64      `json:"oldest_pending_ms,omitempty"`
	LastError       string     `json:"last_error,omitempty"`
	LastErrorAt     *time.Time `json:"last_error_at,omitempty"`
}

// RelayRetryReply answers P.relay.retry: how many dead deliveries were put
// back in their queues.
type RelayRetryReply struct {
	OK      bool   `json:"ok"`
	Retried int    `json:"retried"`
	Error   string `json:"error,omitempty"`
}

// Bounds of what relay stores: WhatsApp ids are short, and a receipt names
// a bounded batch of messages.
const (
	MaxIDLen          = 256
	MaxReceiptIDs     = 1024
	MaxIdempotencyLen = 128
	MaxReplayLimit    = 1000
)

// DecodeRelayStore reads a P.relay.store body strictly: exactly one of
// "message" and "receipt"; a message needs "id" and "chat", a receipt "chat"
// and at least one id.
func DecodeRelayStore(data []byte) (RelayStoreRequest, error) {
	var r RelayStoreRequest
	if err := decodeStrict(data, &r); err != nil {
		return RelayStoreRequest{}, err
	}
	switch {
	case (r.Message == nil) == (r.Receipt == nil):
		return RelayStoreRequest{}, errors.New(`exactly one of "message" and "receipt" is required`)
	case r.Message != nil:
		m := r.Message
		if err := checkID("message", m.ID, m.Chat); err != nil {
			return RelayStoreRequest{}, err
		}
		if len(m.Text) > 4*MaxTextLen {
			return RelayStoreRequest{}, fmt.Errorf(`message "text" is longer than %d bytes`, 4*MaxTextLen)
		}
	default:
		rc := r.Receipt
		if len(rc.IDs) == 0 || len(rc.IDs) > MaxReceiptIDs {
			return RelayStoreRequest{}, fmt.Errorf(`receipt "ids": want 1 to %d ids`, MaxReceiptIDs)
		}
		for _, id := range rc.IDs {
			if err := checkID("receipt", id, rc.Chat); err != nil {
				return RelayStoreRequest{}, err
			}
		}
		if rc.Type == "" || len(rc.Type) > 32 {
			return RelayStoreRequest{}, errors.New(`receipt "type" is required (at most 32 bytes)`)
		}
	}
	return r, nil
}

func checkID(what, id, chat string) error {
	switch {
	case id == "" || len(id) > MaxIDLen:
		return fmt.Errorf(`%s "id": want 1 to %d bytes`, what, MaxIDLen)
	case chat == "" || len(chat) > MaxIDLen:
		return fmt.Errorf(`%s "chat": want 1 to %d bytes`, what, MaxIDLen)
	}
	return nil
}

// DecodeMsgReplay reads a P.msg.replay body strictly: "after_seq" at least
// 0, "limit" from 0 (relay's default) to MaxReplayLimit. An empty body is
// everything from the start.
func DecodeMsgReplay(data []byte) (MsgReplayRequest, error) {
	var r MsgReplayRequest
	if len(bytes.TrimSpace(data)) == 0 {
		return r, nil
	}
	if err := decodeStrict(data, &r); err != nil {
		return MsgReplayRequest{}, err
	}
	switch {
	case r.AfterSeq < 0:
		return MsgReplayRequest{}, errors.New(`"after_seq" must be 0 or more`)
	case r.Limit < 0 || r.Limit > MaxReplayLimit:
		return MsgReplayRequest{}, fmt.Errorf(`"limit": want 0 (the default) to %d`, MaxReplayLimit)
	}
	return r, nil
}

// DecodeRelayRetry reads a P.relay.retry body: empty or {}.
func DecodeRelayRetry(data []byte) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	var v struct{}
	return decodeStrict(data, &v)
}
