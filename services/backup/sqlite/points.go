package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/internal/sqltext"
)

var _ backup.Points = (*Store)(nil)

// InsertPoint stores the point, its new pieces and references, and runs
// inTx, in one transaction.
func (s *Store) InsertPoint(ctx context.Context, p backup.NewPoint, inTx backup.InTx) (int64, error) {
	var id int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if p.LeaseHolder != "" {
			res, err := tx.ExecContext(ctx, sqltext.HoldGeneration, p.SessionID, p.LeaseHolder, p.LeaseNow.UnixMilli(), p.Generation)
			if err != nil {
				return err
			}
			if k, err := res.RowsAffected(); err != nil || k != 1 {
				return backup.ErrLeaseLost
			}
		}
		for _, pc := range p.Pieces {
			if _, err := tx.ExecContext(ctx, sqltext.InsertPiece, p.SessionID, pc.ID, int64(len(pc.Data)), pc.Data); err != nil {
				return fmt.Errorf("piece %s: %w", pc.ID, err)
			}
		}
		err := tx.QueryRowContext(ctx, sqltext.InsertPoint, p.SessionID, p.Generation, p.Seq, p.Kind, p.ManifestID, p.Parent,
			p.CreatedAt.UTC(), p.Reason, p.DBSHA256, p.SizeBytes, p.StoredBytes, p.Manifest).Scan(&id)
		if err != nil {
			return err
		}
		refs := map[string]bool{}
		for _, r := range p.Refs {
			if refs[r] {
				continue
			}
			refs[r] = true
			if _, err := tx.ExecContext(ctx, sqltext.InsertPointPiece, id, p.SessionID, r); err != nil {
				return err
			}
		}
		var n int
		if err := tx.QueryRowContext(ctx, sqltext.CountPointPieces, id).Scan(&n); err != nil {
			return err
		}
		if n != len(refs) {
			return backup.ErrPieceMissing
		}
		if inTx != nil {
			return inTx(ctx, backup.DriverTx[*sql.Tx]{Tx: tx})
		}
		return nil
	})
	switch {
	case errors.Is(err, backup.ErrLeaseLost):
		return 0, backup.ErrLeaseLost
	case err != nil:
		return 0, fmt.Errorf("insert point: %w", err)
	}
	return id, nil
}

// ListPoints returns points newest first.
func (s *Store) ListPoints(ctx context.Context, session string, limit int) ([]backup.PointInfo, error) {
	rows, err := s.db.QueryContext(ctx, sqltext.ListPoints, session, limit)
	if err != nil {
		return nil, fmt.Errorf("list points: %w", err)
	}
	defer rows.Close()
	var list []backup.PointInfo
	for rows.Next() {
		var p backup.PointInfo
		if err := rows.Scan(&p.ID, &p.SessionID, &p.Generation, &p.Seq, &p.Kind, &p.ManifestID, &p.Parent, &p.CreatedAt,
			&p.Reason, &p.DBSHA256, &p.SizeBytes, &p.StoredBytes); err != nil {
			return nil, fmt.Errorf("list points: %w", err)
		}
		p.CreatedAt = p.CreatedAt.UTC()
		list = append(list, p)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list points: %w", err)
	}
	return list, nil
}

// Manifests returns every sealed manifest of session, oldest first.
func (s *Store) Manifests(ctx context.Context, session string) ([]backup.SealedManifest, error) {
	rows, err := s.db.QueryContext(ctx, sqltext.PointManifests, session)
	if err != nil {
		return nil, fmt.Errorf("read manifests: %w", err)
	}
	defer rows.Close()
	var list []backup.SealedManifest
	for rows.Next() {
		var m backup.SealedManifest
		if err := rows.Scan(&m.ID, &m.Sealed); err != nil {
			return nil, fmt.Errorf("read manifests: %w", err)
		}
		list = append(list, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read manifests: %w", err)
	}
	return list, nil
}

// HasPiece tells whether session holds piece id.
func (s *Store) HasPiece(ctx context.Context, session, id string) (bool, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, sqltext.HasPiece, session, id).Scan(&n); err != nil {
		return false, fmt.Errorf("piece %s: %w", id, err)
	}
	return n > 0, nil
}

// Piece returns a piece's sealed bytes, or ErrNotFound.
func (s *Store) Piece(ctx context.Context, session, id string) ([]byte, error) {
	var b []byte
	err := s.db.QueryRowContext(ctx, sqltext.PiecePayload, session, id).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, backup.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("read piece %s: %w", id, err)
	}
	return b, nil
}

// DeletePoints deletes points and then the pieces nothing references.
func (s *Store) DeletePoints(ctx context.Context, session string, ids []int64) (points, pieces int64, err error) {
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		points, pieces = 0, 0
		for _, id := range ids {
			if _, err := tx.ExecContext(ctx, sqltext.DeletePointRefs, id, session); err != nil {
				return err
			}
			res, err := tx.ExecContext(ctx, sqltext.DeletePoint, session, id)
			if err != nil {
				return err
			}
			n, _ := res.RowsAffected()
			points += n
		}
		res, err := tx.ExecContext(ctx, sqltext.DeleteUnreferencedPieces, session)
		if err != nil {
			return err
		}
		pieces, _ = res.RowsAffected()
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("delete points: %w", err)
	}
	return points, pieces, nil
}

// PointStats sums session's points and their storage.
func (s *Store) PointStats(ctx context.Context, session string) (backup.PointStats, error) {
	var st backup.PointStats
	err := s.db.QueryRowContext(ctx, sqltext.PointStats, session).Scan(&st.Points, &st.Bases, &st.ManifestBytes, &st.Pieces, &st.PieceBytes)
	if err != nil {
		return st, fmt.Errorf("point stats: %w", err)
	}
	return st, nil
}
