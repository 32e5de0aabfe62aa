package sqlstore

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver
)

// SQLiteOptions configure OpenSQLite.
type SQLiteOptions struct {
	// ImmediateTx makes transactions take the write lock when they begin
	// (_txlock=immediate): when another connection writes the same file, a
	// deferred transaction that read before writing would fail with
	// SQLITE_BUSY instead of waiting.
	ImmediateTx bool
}

// OpenSQLite opens (creating, owner only) the database at path: WAL, a busy
// timeout, foreign keys, and one connection, since SQLite has one writer and
// River shares the pool.
func OpenSQLite(ctx context.Context, path string, opts SQLiteOptions) (*sql.DB, error) {
	if err := sqlitefile.Prepare(path); err != nil {
		return nil, fmt.Errorf("sqlite: %w", err)
	}
	q := url.Values{"_pragma": {"journal_mode(WAL)", "busy_timeout(10000)", "foreign_keys(1)", "synchronous(NORMAL)"}}
	if opts.ImmediateTx {
		q.Set("_txlock", "immediate")
	}
	db, err := sql.Open("sqlite", sqlitefile.URI(path, q))
	if err != nil {
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	if err := PingSQLite(ctx, db); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// PingSQLite checks the file opens.
func PingSQLite(ctx context.Context, db *sql.DB) error {
	if err := db.PingContext(ctx); err != nil {
		return fmt.Errorf("sqlite: %w", err)
	}
	return nil
}

// MigrateSQLite runs first (River's migrations), then the steps not yet
// recorded, each in its own transaction with its record. No lock: SQLite has
// one writer, and a step and its record commit together.
func MigrateSQLite(ctx context.Context, db *sql.DB, first func(context.Context) error, m Migrations) error {
	if first != nil {
		if err := first(ctx); err != nil {
			return err
		}
	}
	if _, err := db.ExecContext(ctx, m.createTable()); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	done, err := appliedSQLite(ctx, db, m)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	for _, step := range m.Steps {
		if done[step.Version] {
			continue
		}
		if err := applySQLite(ctx, db, m, step); err != nil {
			return fmt.Errorf("migrate %d (%s): %w", step.Version, step.Name, err)
		}
	}
	return nil
}

func appliedSQLite(ctx context.Context, db *sql.DB, m Migrations) (map[int]bool, error) {
	rows, err := db.QueryContext(ctx, m.appliedVersions())
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	done := map[int]bool{}
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		done[v] = true
	}
	return done, rows.Err()
}

func applySQLite(ctx context.Context, db *sql.DB, m Migrations, step Migration) error {
	return InTx(ctx, db, func(tx *sql.Tx) error {
		for _, q := range step.SQL {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, m.record(), step.Version, step.Name, time.Now().UnixMilli())
		return err
	})
}

// InTx runs fn in a transaction on db: committed when fn returns nil, rolled
// back otherwise.
func InTx(ctx context.Context, db *sql.DB, fn func(*sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}
