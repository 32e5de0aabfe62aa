package sandbox

import (
	"context"
	"fmt"
	"time"
)

// Sent is one message the bot sent (or tried to: Refused says why not).
type Sent struct {
	ID        string
	To        string
	Text      string
	Timestamp time.Time
	Refused   string
}

// recordSent commits a send to the outbox, then tells OnSent.
func (s *Server) recordSent(ctx context.Context, m Sent) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO outbox (id, to_jid, text, at, refused) VALUES (?, ?, ?, ?, ?)`,
		m.ID, m.To, m.Text, m.Timestamp.UnixNano(), m.Refused)
	if err != nil {
		return fmt.Errorf("sandbox: record send: %w", err)
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
