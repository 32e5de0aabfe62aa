package sandbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.mau.fi/whatsmeow/types"
)

// Device states in the server file.
const (
	deviceLinked    = "linked"
	deviceLoggedOut = "logged_out"
)

// deviceState is what the server knows of jid: linked, logged_out, or ""
// (never seen: a store restored onto a fresh server file).
func (s *Server) deviceState(ctx context.Context, jid types.JID) (string, error) {
	var st string
	err := s.db.QueryRowContext(ctx, `SELECT state FROM devices WHERE jid = ?`, jid.String()).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("sandbox: read device: %w", err)
	}
	return st, nil
}

func (s *Server) setDevice(ctx context.Context, jid types.JID, state string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO devices (jid, state, linked_at) VALUES (?, ?, ?)
		ON CONFLICT (jid) DO UPDATE SET state = excluded.state`, jid.String(), state, s.clock.Now().UnixNano())
	if err != nil {
		return fmt.Errorf("sandbox: write device: %w", err)
	}
	if state != deviceLoggedOut {
		return nil
	}
	// The device is gone: its pre-keys, and the messages queued for it
	// (a device linked later does not receive what was sent before).
	if _, err := s.db.ExecContext(ctx, `DELETE FROM prekeys WHERE device = ?`, jid.String()); err != nil {
		return fmt.Errorf("sandbox: drop the device's pre-keys: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `DELETE FROM inbox WHERE device = ?`, jid.String()); err != nil {
		return fmt.Errorf("sandbox: drop the device's messages: %w", err)
	}
	return nil
}

// linkedDevice is the device messages are sent to now: the one linked
// last and not logged out, or "" when none is.
func (s *Server) linkedDevice(ctx context.Context, q querier) (string, error) {
	var jid string
	err := q.QueryRowContext(ctx, `SELECT jid FROM devices WHERE state = ? ORDER BY rowid DESC LIMIT 1`, deviceLinked).Scan(&jid)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("sandbox: read devices: %w", err)
	}
	return jid, nil
}

// banned returns the ban in force: its code and how long it still lasts
// (zero: no stated expiry).
func (s *Server) banned(ctx context.Context) (code int, left time.Duration, on bool, err error) {
	untilS, err := getMeta(ctx, s.db, "ban_until")
	if err != nil || untilS == "" {
		return 0, 0, false, err
	}
	until, _ := strconv.ParseInt(untilS, 10, 64)
	codeS, _ := getMeta(ctx, s.db, "ban_code")
	code, _ = strconv.Atoi(codeS)
	now := s.clock.Now().UnixNano()
	if until <= now {
		return 0, 0, false, nil
	}
	explicit, _ := getMeta(ctx, s.db, "ban_stated")
	if explicit == "1" {
		left = time.Duration(until - now)
	}
	return code, left, true, nil
}
