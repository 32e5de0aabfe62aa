// Package postgres is the backup Store on PostgreSQL (pgx pool), with River
// through riverpgxv5.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlstore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/internal/sqltext"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
)

var _ backup.Store = (*Store)(nil)

// Options configure Open.
type Options struct {
	// URL is config.PostgresURL(): Heroku's sslmode rule already applied.
	URL      string
	MaxConns int
	// Tracer, when set, sees every query and acquire of the pool (a
	// dboutage.Outage: it hears of an outage before River logs it).
	Tracer pgx.QueryTracer
}

// Store keeps snapshots and leases in PostgreSQL.
type Store struct {
	pool *pgxpool.Pool
}

// Open connects and pings; the error never shows the URL's password.
func Open(ctx context.Context, opts Options) (*Store, error) {
	pool, err := sqlstore.OpenPostgres(ctx, sqlstore.PostgresOptions{URL: opts.URL, MaxConns: opts.MaxConns, Tracer: opts.Tracer})
	if err != nil {
		return nil, err
	}
	return &Store{pool: pool}, nil
}

// Pool is the connection pool (River UI uses it).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Kind is "postgres".
func (s *Store) Kind() string { return "postgres" }

// Ping checks the server answers.
func (s *Store) Ping(ctx context.Context) error { return sqlstore.PingPostgres(ctx, s.pool) }

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

// Migrate runs River's migrations and ours under the advisory lock every
// service's migrations take.
func (s *Store) Migrate(ctx context.Context) error {
	river := func(ctx context.Context) error { return backup.MigrateRiver(ctx, riverpgxv5.New(s.pool)) }
	return sqlstore.MigratePostgres(ctx, s.pool, river, sqlstore.Migrations{Table: sqltext.MigrationsTable, Steps: sqltext.PostgresMigrations})
}

// InsertSnapshot inserts the row and runs inTx in one transaction.
func (s *Store) InsertSnapshot(ctx context.Context, n backup.NewSnapshot, inTx backup.InTx) (int64, error) {
	var id int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if n.LeaseHolder != "" {
			tag, err := tx.Exec(ctx, sqltext.HoldLease, n.SessionID, n.LeaseHolder, n.LeaseNow.UnixMilli())
			if err != nil {
				return err
			}
			if tag.RowsAffected() != 1 {
				return backup.ErrLeaseLost
			}
		}
		err := tx.QueryRow(ctx, sqltext.InsertSnapshot, n.SessionID, n.CreatedAt.UTC(), n.Reason, n.SHA256,
			n.SizeBytes, n.StoredBytes, n.Format, n.Payload).Scan(&id)
		if err != nil {
			return err
		}
		if inTx != nil {
			return inTx(ctx, backup.DriverTx[pgx.Tx]{Tx: tx})
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
	rows, err := s.pool.Query(ctx, sqltext.ListSnapshots, session, limit)
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (backup.Snapshot, error) {
		var sn backup.Snapshot
		err := r.Scan(&sn.ID, &sn.SessionID, &sn.CreatedAt, &sn.Reason, &sn.SHA256, &sn.SizeBytes, &sn.StoredBytes, &sn.Format)
		sn.CreatedAt = sn.CreatedAt.UTC()
		return sn, err
	})
	if err != nil {
		return nil, fmt.Errorf("list snapshots: %w", err)
	}
	return list, nil
}

// Payload returns the stored bytes of id.
func (s *Store) Payload(ctx context.Context, id int64) ([]byte, error) {
	var p []byte
	err := s.pool.QueryRow(ctx, sqltext.SnapshotPayload, id).Scan(&p)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, backup.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("read snapshot %d: %w", id, err)
	}
	return p, nil
}

// Prune keeps the newest keep snapshots.
func (s *Store) Prune(ctx context.Context, session string, keep int) (int64, error) {
	tag, err := s.pool.Exec(ctx, sqltext.PruneSnapshots, session, keep)
	if err != nil {
		return 0, fmt.Errorf("prune snapshots: %w", err)
	}
	return tag.RowsAffected(), nil
}

// AcquireLease takes or renews the lease.
func (s *Store) AcquireLease(ctx context.Context, session, holder string, now time.Time, ttl time.Duration, stale backup.Lease) (backup.Lease, bool, error) {
	if _, err := s.pool.Exec(ctx, sqltext.AcquireLease, session, holder, now.UnixMilli(), now.Add(ttl).UnixMilli(),
		stale.Holder, stale.Version, stale.RenewedAt.UnixMilli()); err != nil {
		return backup.Lease{}, false, fmt.Errorf("acquire lease: %w", err)
	}
	l := backup.Lease{SessionID: session}
	var acq, ren, exp int64
	err := s.pool.QueryRow(ctx, sqltext.GetLease, session).Scan(&l.Holder, &acq, &ren, &exp, &l.Version, &l.Generation)
	if errors.Is(err, pgx.ErrNoRows) {
		return l, false, nil // released between the two statements: try again
	}
	if err != nil {
		return backup.Lease{}, false, fmt.Errorf("read lease: %w", err)
	}
	l.AcquiredAt, l.RenewedAt, l.ExpiresAt = time.UnixMilli(acq).UTC(), time.UnixMilli(ren).UTC(), time.UnixMilli(exp).UTC()
	return l, l.Holder == holder, nil
}

// ReleaseLease frees holder's lease and tells listeners (WatchLeases) in the
// same transaction.
func (s *Store) ReleaseLease(ctx context.Context, session, holder string) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, sqltext.ReleaseLease, session, holder)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		_, err = tx.Exec(ctx, sqltext.NotifyLease, session)
		return err
	})
	if err != nil {
		return fmt.Errorf("release lease: %w", err)
	}
	return nil
}

var _ backup.LeaseWatcher = (*Store)(nil)

// WatchLeases listens on one pooled connection for released leases.
func (s *Store) WatchLeases(ctx context.Context, session string, released func()) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("listen for lease releases: %w", err)
	}
	// A connection that LISTENs must not go back to the pool as it is.
	pc := conn.Hijack()
	defer pc.Close(context.WithoutCancel(ctx))
	if _, err := pc.Exec(ctx, "LISTEN "+sqltext.LeaseChannel); err != nil {
		return fmt.Errorf("listen for lease releases: %w", err)
	}
	for {
		n, err := pc.WaitForNotification(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("listen for lease releases: %w", err)
		}
		if n.Payload == session {
			released()
		}
	}
}

// NewQueue builds River on this pool.
func (s *Store) NewQueue(cfg backup.QueueConfig) (backup.Queue, error) {
	return backup.NewRiverQueue(riverpgxv5.New(s.pool), cfg)
}
