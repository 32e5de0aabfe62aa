package sandbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
)

// Receipt kinds a test may ask for (P.sandbox.receipt): what the contact's
// phone says about messages the bot sent it.
const (
	ReceiptDelivered = "delivered" // whatsmeow's types.ReceiptTypeDelivered, the empty string
	ReceiptRead      = "read"
)

// deliveredAfter is when the contact's phone reports a message delivered,
// counted from the moment the server accepted the send: WhatsApp's delivery
// receipt follows the server's ack, never precedes it, so the gateway has
// its send answer before the receipt arrives.
const deliveredAfter = time.Second

// MaxReceiptIDs bounds one receipt request: a phone that opens a chat
// reads its unread messages in one receipt, a bounded batch.
const MaxReceiptIDs = 100

// ReceiptRequest asks the contact's phone to send a receipt for messages
// the bot sent it (ids from P.sandbox.out or the outbox), as one receipt
// naming them all.
type ReceiptRequest struct {
	IDs  []string
	Type string // ReceiptDelivered or ReceiptRead
}

// QueuedReceipt is the receipt the server committed, to be delivered to
// the device linked now.
type QueuedReceipt struct {
	Chat      types.JID // the contact, also the receipt's sender
	Timestamp time.Time // whole seconds, as WhatsApp's "t" attribute
}

// queuedReceipt is one receipt not acknowledged yet.
type queuedReceipt struct {
	seq       int64
	ids       []string
	chat      string
	typ       types.ReceiptType
	at        time.Time
	deliverAt time.Time
}

// Receipt commits a receipt from the contact the messages went to (answered
// only once it is in the server file, so a killed process still delivers it
// after its restart) and wakes the attached client. It is refused for an id
// the bot never sent (or whose send was refused), for a send to a group
// (the sandbox simulates no members to read it) and for ids sent to
// different contacts.
func (s *Server) Receipt(ctx context.Context, r ReceiptRequest) (QueuedReceipt, error) {
	var typ types.ReceiptType
	switch r.Type {
	case ReceiptDelivered:
		typ = types.ReceiptTypeDelivered
	case ReceiptRead:
		typ = types.ReceiptTypeRead
	default:
		return QueuedReceipt{}, bad("type: %q is not a receipt the sandbox sends (want %s or %s)", r.Type, ReceiptDelivered, ReceiptRead)
	}
	switch {
	case len(r.IDs) == 0:
		return QueuedReceipt{}, bad("id: the id of a message the bot sent is required")
	case len(r.IDs) > MaxReceiptIDs:
		return QueuedReceipt{}, bad("ids: at most %d in one receipt", MaxReceiptIDs)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return QueuedReceipt{}, fmt.Errorf("sandbox: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	device, err := s.linkedDevice(ctx, tx)
	if err != nil {
		return QueuedReceipt{}, err
	}
	if device == "" {
		return QueuedReceipt{}, bad("not linked: no device is linked to receive the receipt (link first)")
	}
	var chat string
	for _, id := range r.IDs {
		to, err := sentTo(ctx, tx, id)
		switch {
		case err != nil:
			return QueuedReceipt{}, err
		case to == "":
			return QueuedReceipt{}, bad("id: %q is no message the bot sent (see P.sandbox.outbox; a refused send has no id)", id)
		case chat != "" && to != chat:
			return QueuedReceipt{}, bad("ids: %q went to %s, the others to %s: one receipt is one contact's", id, to, chat)
		}
		chat = to
	}
	jid, err := types.ParseJID(chat)
	if err != nil {
		return QueuedReceipt{}, fmt.Errorf("sandbox: outbox recipient %q: %w", chat, err)
	}
	if jid.Server != types.DefaultUserServer {
		return QueuedReceipt{}, bad("id: %q went to %s: the sandbox simulates no group members, so nobody sends receipts there", r.IDs[0], chat)
	}
	now := s.clock.Now()
	at := now.Truncate(time.Second).UTC()
	if err := queueReceipt(ctx, tx, r.IDs, chat, typ, at, now, device); err != nil {
		return QueuedReceipt{}, err
	}
	if err := tx.Commit(); err != nil {
		return QueuedReceipt{}, fmt.Errorf("sandbox: queue receipt: %w", err)
	}
	if c := s.current(); c != nil {
		c.wake()
	}
	return QueuedReceipt{Chat: jid, Timestamp: at}, nil
}

// sentTo is the recipient of the accepted send id, empty when there is
// none.
func sentTo(ctx context.Context, q querier, id string) (string, error) {
	var to string
	err := q.QueryRowContext(ctx, `SELECT to_jid FROM outbox WHERE id = ? AND refused = '' ORDER BY seq LIMIT 1`, id).Scan(&to)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("sandbox: read outbox: %w", err)
	}
	return to, nil
}

// queueReceipt commits a receipt for device, due at due.
func queueReceipt(ctx context.Context, q querier, ids []string, chat string, typ types.ReceiptType, at, due time.Time, device string) error {
	body, err := json.Marshal(ids)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	if _, err := q.ExecContext(ctx, `INSERT INTO receipts (ids, chat, type, at, deliver_at, device) VALUES (?, ?, ?, ?, ?, ?)`,
		string(body), chat, string(typ), at.UnixNano(), due.UnixNano(), device); err != nil {
		return fmt.Errorf("sandbox: queue receipt: %w", err)
	}
	return nil
}

// nextReceipt is nextPending for receipts: the first unacknowledged one for
// device after the cursor that is due at now, or the time the next one
// falls due.
func (s *Server) nextReceipt(ctx context.Context, device types.JID, afterAt, afterSeq int64, now time.Time) (*queuedReceipt, time.Time, error) {
	row := s.db.QueryRowContext(ctx, `SELECT seq, ids, chat, type, at, deliver_at FROM receipts
		WHERE acked_at IS NULL AND device = ? AND (deliver_at > ? OR (deliver_at = ? AND seq > ?))
		ORDER BY deliver_at, seq LIMIT 1`, device.String(), afterAt, afterAt, afterSeq)
	var r queuedReceipt
	var ids, typ string
	var at, due int64
	err := row.Scan(&r.seq, &ids, &r.chat, &typ, &at, &due)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: read receipts: %w", err)
	}
	r.typ, r.at, r.deliverAt = types.ReceiptType(typ), time.Unix(0, at).UTC(), time.Unix(0, due)
	if r.deliverAt.After(now) {
		return nil, r.deliverAt, nil
	}
	if err := json.Unmarshal([]byte(ids), &r.ids); err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: receipt row %d: %w", r.seq, err)
	}
	return &r, time.Time{}, nil
}

func (s *Server) markReceiptDelivered(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE receipts SET deliveries = deliveries + 1 WHERE seq = ?`, seq)
	return err
}

func (s *Server) ackReceipt(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE receipts SET acked_at = ? WHERE seq = ? AND acked_at IS NULL`, s.clock.Now().UnixNano(), seq)
	if err != nil {
		return fmt.Errorf("sandbox: ack receipt: %w", err)
	}
	return nil
}

// ReceiptDeliveries is how often the receipts naming message id were
// handed to the gateway, and whether all of them were acknowledged.
func (s *Server) ReceiptDeliveries(ctx context.Context, id string) (n int, acked bool, err error) {
	var unacked int
	err = s.db.QueryRowContext(ctx, `SELECT coalesce(sum(deliveries), 0), count(*) FILTER (WHERE acked_at IS NULL) FROM receipts
		WHERE EXISTS (SELECT 1 FROM json_each(receipts.ids) WHERE value = ?)`, id).Scan(&n, &unacked)
	return n, unacked == 0, err
}

// buildReceipt is the event whatsmeow's parseReceipt makes of a contact's
// receipt in a direct chat: from the contact's phone (device 0), so Chat
// and Sender are its JID; not from us.
func buildReceipt(r *queuedReceipt) (*events.Receipt, error) {
	chat, err := types.ParseJID(r.chat)
	if err != nil {
		return nil, fmt.Errorf("sandbox: receipt chat %q: %w", r.chat, err)
	}
	return &events.Receipt{
		MessageSource: types.MessageSource{Chat: chat.ToNonAD(), Sender: chat},
		MessageIDs:    slices.Clone(r.ids),
		Timestamp:     r.at,
		Type:          r.typ,
	}, nil
}
