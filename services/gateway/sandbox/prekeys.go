package sandbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"go.mau.fi/whatsmeow/types"
)

// uploadedPreKeys records the pre-key ids the device handed the server.
func (s *Server) uploadedPreKeys(ctx context.Context, device types.JID, ids []uint32) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	for _, id := range ids {
		if _, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO prekeys (device, key_id) VALUES (?, ?)`, device.String(), id); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// takePreKey hands out one of the device's uploaded pre-keys to a new
// contact, as the server does for a pre-key bundle; false when none is left.
func (s *Server) takePreKey(ctx context.Context, device types.JID) (uint32, bool, error) {
	var id uint32
	err := s.db.QueryRowContext(ctx, `DELETE FROM prekeys WHERE rowid = (SELECT rowid FROM prekeys WHERE device = ? ORDER BY key_id LIMIT 1) RETURNING key_id`, device.String()).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("sandbox: take pre-key: %w", err)
	}
	return id, true, nil
}

func (s *Server) serverPreKeys(ctx context.Context, device types.JID) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM prekeys WHERE device = ?`, device.String()).Scan(&n)
	return n, err
}
