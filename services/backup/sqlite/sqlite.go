// Package sqlite is the backup Store on an embedded SQLite database
// (modernc, pure Go), with River through riversqlite: the zero-infrastructure
// default when DATABASE_URL is empty.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlstore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/internal/sqltext"
	"github.com/riverqueue/river/riverdriver/riversqlite"
)

var _ backup.Store = (*Store)(nil)

// Store keeps snapshots and leases in one SQLite file.
type Store struct {
	db *sql.DB
}

// Open opens (creating) the database at path. It holds snapshots (plaintext
// without a key) and the lease: the file is its owner's only.
func Open(ctx context.Context, path string) (*Store, error) {
	db, err := sqlstore.OpenSQLite(ctx, path, sqlstore.SQLiteOptions{})
	if err != nil {
		return nil, err
	}
	return &Store{db: db}, nil
}

// DB is the database handle.
func (s *Store) DB() *sql.DB { return s.db }

// Kind is "sqlite".
func (s *Store) Kind() string { return "sqlite" }

// Ping checks the file opens.
func (s *Store) Ping(ctx context.Context) error { return sqlstore.PingSQLite(ctx, s.db) }

// Close closes the database.
func (s *Store) Close() { _ = s.db.Close() }

// Migrate runs River's migrations and ours.
func (s *Store) Migrate(ctx context.Context) error {
	river := func(ctx context.Context) error { return backup.MigrateRiver(ctx, riversqlite.New(s.db)) }
	return sqlstore.MigrateSQLite(ctx, s.db, river, sqlstore.Migrations{Table: sqltext.MigrationsTable, Steps: sqltext.SQLiteMigrations})
}

func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	return sqlstore.InTx(ctx, s.db, fn)
}

// InsertSnapshot inserts the row and runs inTx in one transaction.
func (s *Store) InsertSnapshot(ctx context.Context, n backup.NewSnapshot, inTx backup.InTx) (int64, error) {
	var id int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if n.LeaseHolder != "" {
			res, err := tx.ExecContext(ctx, sqltext.HoldLease, n.SessionID, n.LeaseHolder, n.LeaseNow.UnixMilli())
			if err != nil {
				return err
			}
			if k, err := res.RowsAffected(); err != nil || k != 1 {
				return backup.ErrLeaseLost
			}
		}
		err := tx.QueryRowContext(ctx, sqltext.InsertSnapshot, n.SessionID, n.CreatedAt.UTC(), n.Reason, n.SHA256,
			n.SizeBytes, n.StoredBytes, n.Format, n.Payload).Scan(&id)
		if err != nil {
			return err
		}
		if inTx != nil {
			return inTx(ctx, backup.DriverTx[*sql.Tx]{Tx: tx})
		}
		return nil
	})
	if errors.Is(err, backup.ErrLeaseLost) {
		return 0, backup.ErrLeaseLost
	}
	if err != nil {
		return 0, fmt.Errorf("insert snapshot: %w", err)
	}
	return id, nil
}

// List returns snapshots newest first.
func (s *Store) List(ctx context.Context, session string, limit int) ([]backup.Snapshot, error) {
	rows, err := s.db.QueryContext(ctx, sqltext.ListSnapshots, session, limit)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	defer rows.Close()
	var list []backup.Snapshot
	for rows.Next() {
		var sn backup.Snapshot
		if err := rows.Scan(&sn.ID, &sn.SessionID, &sn.CreatedAt, &sn.Reason, &sn.SHA256, &sn.SizeBytes, &sn.StoredBytes, &sn.Format); err != nil {
			return nil, fmt.Errorf("list snapshots: %w", err)
		}
		sn.CreatedAt = sn.CreatedAt.UTC()
		list = append(list, sn)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	return list, nil
}

// Payload returns the stored bytes of id.
func (s *Store) Payload(ctx context.Context, id int64) ([]byte, error) {
	var p []byte
	err := s.db.QueryRowContext(ctx, sqltext.SnapshotPayload, id).Scan(&p)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, backup.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("read snapshot %d: %w", id, err)
	}
	return p, nil
}

// Prune keeps the newest keep snapshots.
func (s *Store) Prune(ctx context.Context, session string, keep int) (int64, error) {
	res, err := s.db.ExecContext(ctx, sqltext.PruneSnapshots, session, keep)
	if err != nil {
		return 0, fmt.Errorf("prune snapshots: %w", err)
	}
	n, _ := res.RowsAffected()
	return n, nil
}

// AcquireLease takes or renews the lease.
func (s *Store) AcquireLease(ctx context.Context, session, holder string, now time.Time, ttl time.Duration, stale backup.Lease) (backup.Lease, bool, error) {
	l := backup.Lease{SessionID: session}
	var acq, ren, exp int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, sqltext.AcquireLease, session, holder, now.UnixMilli(), now.Add(ttl).UnixMilli(),
			stale.Holder, stale.Version, stale.RenewedAt.UnixMilli()); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, sqltext.GetLease, session).Scan(&l.Holder, &acq, &ren, &exp, &l.Version, &l.Generation)
	})
	if err != nil {
		return backup.Lease{}, false, fmt.Errorf("acquire lease: %w", err)
	}
	l.AcquiredAt, l.RenewedAt, l.ExpiresAt = time.UnixMilli(acq).UTC(), time.UnixMilli(ren).UTC(), time.UnixMilli(exp).UTC()
	return l, l.Holder == holder, nil
}

// ReleaseLease frees holder's lease.
func (s *Store) ReleaseLease(ctx context.Context, session, holder string) error {
	if _, err := s.db.ExecContext(ctx, sqltext.ReleaseLease, session, holder); err != nil {
		return fmt.Errorf("release lease: %w", err)
	}
	return nil
}

// NewQueue builds River on this database.
func (s *Store) NewQueue(cfg backup.QueueConfig) (backup.Queue, error) {
	if cfg.PollInterval == 0 {
		// No LISTEN/NOTIFY in SQLite: local inserts wake the producer, but a
		// job inserted by another process (blacksky backup-now goes over NATS,
		// so rarely) is found by polling.
		cfg.PollInterval = time.Second
	}
	return backup.NewRiverQueue(riversqlite.New(s.db), cfg)
}
