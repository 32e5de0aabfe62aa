package sandbox

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.mau.fi/whatsmeow/types"
)

// Sent is one message the bot sent (or tried to: Refused says why not).
type Sent struct {
	ID        string
	To        string
	Text      string
	Timestamp time.Time
	Refused   string
}

// recordSent commits a send to the outbox, then tells OnSent. An accepted
// send to a contact commits, in the same transaction, the delivery receipt
// the contact's phone sends for it deliveredAfter later, addressed to
// device (the sender): a killed process cannot keep the send and lose its
// receipt.
func (s *Server) recordSent(ctx context.Context, m Sent, device types.JID) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("sandbox: record send: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	if _, err := tx.ExecContext(ctx, `INSERT INTO outbox (id, to_jid, text, at, refused) VALUES (?, ?, ?, ?, ?)`,
		m.ID, m.To, m.Text, m.Timestamp.UnixNano(), m.Refused); err != nil {
		return fmt.Errorf("sandbox: record send: %w", err)
	}
	receipt := m.Refused == "" && m.ID != "" && !device.IsEmpty() && strings.HasSuffix(m.To, "@"+types.DefaultUserServer)
	if receipt {
		due := s.clock.Now().Add(deliveredAfter)
		if err := queueReceipt(ctx, tx, []string{m.ID}, m.To, types.ReceiptTypeDelivered, due.Truncate(time.Second).UTC(), due, device.String()); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("sandbox: record send: %w", err)
	}
	if receipt {
		if c := s.current(); c != nil {
			c.wake()
		}
	}
	if f := s.onSent.Load(); f != nil && *f != nil {
		(*f)(m)
	}
	return nil
}

// Outbox returns the newest limit sends, oldest first.
func (s *Server) Outbox(ctx context.Context, limit int) ([]Sent, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, to_jid, text, at, refused FROM
		(SELECT * FROM outbox ORDER BY seq DESC LIMIT ?) ORDER BY seq`, limit)
	if err != nil {
		return nil, fmt.Errorf("sandbox: read outbox: %w", err)
	}
	defer rows.Close()
	var out []Sent
	for rows.Next() {
		var m Sent
		var at int64
		if err := rows.Scan(&m.ID, &m.To, &m.Text, &at, &m.Refused); err != nil {
			return nil, fmt.Errorf("sandbox: read outbox: %w", err)
		}
		m.Timestamp = time.Unix(0, at).UTC()
		out = append(out, m)
	}
	return out, rows.Err()
}

// takeRefusal consumes one armed send refusal.
func (s *Server) takeRefusal() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refuseN == 0 {
		return ""
	}
	s.refuseN--
	return s.refuse
}
