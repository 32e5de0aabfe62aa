package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PostgresOptions configure OpenPostgres.
type PostgresOptions struct {
	// URL is config.PostgresURL(): Heroku's sslmode rule already applied.
	URL      string
	MaxConns int
	// Tracer, when set, sees every query and acquire of the pool.
	Tracer pgx.QueryTracer
}

// OpenPostgres connects and pings; the error never shows the URL's password.
func OpenPostgres(ctx context.Context, opts PostgresOptions) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(opts.URL)
	if err != nil {
		// ParseConfig's error quotes the URL, password and all.
		return nil, errors.New("DATABASE_URL: not a valid PostgreSQL URL")
	}
	if opts.MaxConns > 0 {
		cfg.MaxConns = int32(opts.MaxConns)
	}
	cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	if opts.Tracer != nil {
		cfg.ConnConfig.Tracer = opts.Tracer
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if err := PingPostgres(ctx, pool); err != nil {
		pool.Close()
		return nil, err
	}
	return pool, nil
}

// PingPostgres checks the server answers.
func PingPostgres(ctx context.Context, pool *pgxpool.Pool) error {
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("postgres ping: %w", err)
	}
	return nil
}

// migrationLock serialises the migrations of every service and process on
// one database (a release phase and a starting dyno; backup and relay both
// run River's migrations, which must not run twice at once).
const migrationLock = 0x626b736b // "bksk"

// MigratePostgres runs first (River's migrations), then the steps not yet
// recorded, each in its own transaction with its record, all under the
// advisory lock.
func MigratePostgres(ctx context.Context, pool *pgxpool.Pool, first func(context.Context) error, m Migrations) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, migrationLock); err != nil {
		return fmt.Errorf("migrate: lock: %w", err)
	}
	defer func() {
		_, _ = conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, migrationLock)
	}()
	if first != nil {
		if err := first(ctx); err != nil {
			return err
		}
	}
	if _, err := conn.Exec(ctx, m.createTable()); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	rows, err := conn.Query(ctx, m.appliedVersions())
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	applied, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	done := map[int]bool{}
	for _, v := range applied {
		done[v] = true
	}
	for _, step := range m.Steps {
		if done[step.Version] {
			continue
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for _, q := range step.SQL {
				if _, err := tx.Exec(ctx, q); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, m.record(), step.Version, step.Name, time.Now().UnixMilli())
			return err
		})
		if err != nil {
			return fmt.Errorf("migrate %d (%s): %w", step.Version, step.Name, err)
		}
	}
	return nil
}
