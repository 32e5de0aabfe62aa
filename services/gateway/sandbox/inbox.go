package sandbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/whatsmeow/types"
)

// pending is one unacknowledged message.
type pending struct {
	seq       int64
	id        string
	chat      string
	sender    string
	pushName  string
	typ       string
	body      Content
	sentAt    time.Time
	deliverAt time.Time
}

// nextPending returns the first unacknowledged message for device after the cursor
// (by delivery time, then order of injection) that is due at now, or the
// time the next one falls due.
func (s *Server) nextPending(ctx context.Context, device types.JID, afterAt, afterSeq int64, now time.Time) (*pending, time.Time, error) {
	row := s.db.QueryRowContext(ctx, `SELECT seq, id, chat, sender, push_name, type, body, sent_at, deliver_at FROM inbox
		WHERE acked_at IS NULL AND device IN (?, '') AND (deliver_at > ? OR (deliver_at = ? AND seq > ?))
		ORDER BY deliver_at, seq LIMIT 1`, device.String(), afterAt, afterAt, afterSeq)
	var p pending
	var body string
	var sent, due int64
	err := row.Scan(&p.seq, &p.id, &p.chat, &p.sender, &p.pushName, &p.typ, &body, &sent, &due)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: read inbox: %w", err)
	}
	p.sentAt, p.deliverAt = time.Unix(0, sent).UTC(), time.Unix(0, due)
	if p.deliverAt.After(now) {
		return nil, p.deliverAt, nil
	}
	if err := json.Unmarshal([]byte(body), &p.body); err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: inbox row %d: %w", p.seq, err)
	}
	return &p, time.Time{}, nil
}

func (s *Server) markDelivered(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE inbox SET deliveries = deliveries + 1 WHERE seq = ?`, seq)
	return err
}

func (s *Server) ack(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE inbox SET acked_at = ? WHERE seq = ? AND acked_at IS NULL`, s.clock.Now().UnixNano(), seq)
	if err != nil {
		return fmt.Errorf("sandbox: ack: %w", err)
	}
	return nil
}

// Stats counts the server's messages.
type Stats struct {
	Unacked, Acked, Deliveries, Sent int64
}

// Stats reads the inbox and outbox counters.
func (s *Server) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := s.db.QueryRowContext(ctx, `SELECT
		(SELECT count(*) FROM inbox WHERE acked_at IS NULL),
		(SELECT count(*) FROM inbox WHERE acked_at IS NOT NULL),
		(SELECT coalesce(sum(deliveries), 0) FROM inbox),
		(SELECT count(*) FROM outbox)`).Scan(&st.Unacked, &st.Acked, &st.Deliveries, &st.Sent)
	if err != nil {
		return Stats{}, fmt.Errorf("sandbox: stats: %w", err)
	}
	return st, nil
}

// Deliveries is how often the message with id was handed to the gateway.
func (s *Server) Deliveries(ctx context.Context, id string) (n int, acked bool, err error) {
	var at sql.NullInt64
	err = s.db.QueryRowContext(ctx, `SELECT deliveries, acked_at FROM inbox WHERE id = ?`, id).Scan(&n, &at)
	return n, at.Valid, err
}
