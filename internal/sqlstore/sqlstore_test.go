package sqlstore_test

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/blacksky-md/blacksky/internal/sqlstore"
	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// db is one driver under test: migrate runs m, query counts rows.
type db struct {
	migrate func(context.Context, sqlstore.Migrations) error
	count   func(context.Context, string) (int, error)
}

func drivers() map[string]func(t *testing.T) db {
	return map[string]func(t *testing.T) db{
		"sqlite": func(t *testing.T) db {
			ctx := context.Background()
			h, err := sqlstore.OpenSQLite(ctx, filepath.Join(t.TempDir(), "s.db"), sqlstore.SQLiteOptions{ImmediateTx: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.Close() })
			return db{
				migrate: func(ctx context.Context, m sqlstore.Migrations) error { return sqlstore.MigrateSQLite(ctx, h, nil, m) },
				count: func(ctx context.Context, q string) (n int, err error) {
					return n, h.QueryRowContext(ctx, q).Scan(&n)
				},
			}
		},
		"postgres": func(t *testing.T) db {
			pool := openPostgres(t)
			return db{
				migrate: func(ctx context.Context, m sqlstore.Migrations) error {
					return sqlstore.MigratePostgres(ctx, pool, nil, m)
				},
				count: func(ctx context.Context, q string) (n int, err error) {
					return n, pool.QueryRow(ctx, q).Scan(&n)
				},
			}
		},
	}
}

func openPostgres(t *testing.T) *pgxpool.Pool {
	t.Helper()
	pool, err := sqlstore.OpenPostgres(context.Background(), sqlstore.PostgresOptions{URL: testdb.Postgres(t).URL, MaxConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// Steps that fail when run twice (CREATE TABLE without IF NOT EXISTS).
func steps(prefix string) []sqlstore.Migration {
	return []sqlstore.Migration{
		{Version: 1, Name: "one", SQL: []string{`CREATE TABLE ` + prefix + `_one (id INTEGER)`}},
		{Version: 2, Name: "two", SQL: []string{`CREATE TABLE ` + prefix + `_two (id INTEGER)`, `INSERT INTO ` + prefix + `_two VALUES (1)`}},
	}
}

// Each service's steps run once, recorded in that service's own table: a
// second run applies nothing, and two services numbering from 1 on one
// database do not see each other's versions.
func TestStepsRunOnceRecordedInTheServicesOwnTable(t *testing.T) {
	for name, open := range drivers() {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			d := open(t)
			a := sqlstore.Migrations{Table: "a_migrations", Steps: steps("a")}
			b := sqlstore.Migrations{Table: "b_migrations", Steps: steps("b")}
			for range 2 {
				for _, m := range []sqlstore.Migrations{a, b} {
					if err := d.migrate(ctx, m); err != nil {
						t.Fatal(err)
					}
				}
			}
			for q, want := range map[string]int{
				`SELECT count(*) FROM a_migrations`: 2,
				`SELECT count(*) FROM b_migrations`: 2,
				`SELECT count(*) FROM a_two`:        1,
				`SELECT count(*) FROM b_two`:        1,
			} {
				if n, err := d.count(ctx, q); err != nil || n != want {
					t.Fatalf("%s = %d, %v; want %d", q, n, err, want)
				}
			}
		})
	}
}

// A step that fails leaves neither its changes nor its record: the error
// names it, the steps before it stay applied, and the next run (fixed)
// applies it.
func TestFailedStepLeavesNothingAndRunsAgainNextTime(t *testing.T) {
	for name, open := range drivers() {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			d := open(t)
			bad := steps("c")
			bad[1].SQL = append(append([]string{}, bad[1].SQL...), `NOT SQL`)
			err := d.migrate(ctx, sqlstore.Migrations{Table: "c_migrations", Steps: bad})
			if err == nil || !strings.Contains(err.Error(), "migrate 2 (two)") {
				t.Fatalf("err = %v, want it to name step 2", err)
			}
			if n, err := d.count(ctx, `SELECT count(*) FROM c_migrations`); err != nil || n != 1 {
				t.Fatalf("recorded %d, %v; want step 1 only", n, err)
			}
			if _, err := d.count(ctx, `SELECT count(*) FROM c_two`); err == nil {
				t.Fatal("the failed step's table exists")
			}
			if err := d.migrate(ctx, sqlstore.Migrations{Table: "c_migrations", Steps: steps("c")}); err != nil {
				t.Fatal(err)
			}
			if n, err := d.count(ctx, `SELECT count(*) FROM c_two`); err != nil || n != 1 {
				t.Fatalf("c_two has %d rows, %v; want 1", n, err)
			}
		})
	}
}

// Processes migrating one PostgreSQL database at the same moment (a release
// phase and a starting dyno) take turns: each step runs once and every run
// succeeds.
func TestConcurrentPostgresMigrationsTakeTurns(t *testing.T) {
	pool := openPostgres(t)
	ctx := context.Background()
	m := sqlstore.Migrations{Table: "d_migrations", Steps: steps("d")}
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = sqlstore.MigratePostgres(ctx, pool, nil, m)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM d_two`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("d_two has %d rows, %v; want 1", n, err)
	}
}

// River's migrations (first) run before the service's steps, and their
// error stops the run before any step.
func TestFirstRunsBeforeTheStepsAndItsErrorStopsThem(t *testing.T) {
	ctx := context.Background()
	h, err := sqlstore.OpenSQLite(ctx, filepath.Join(t.TempDir(), "s.db"), sqlstore.SQLiteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	m := sqlstore.Migrations{Table: "e_migrations", Steps: steps("e")}
	errRiver := errors.New("river migrations failed")
	boom := func(context.Context) error { return errRiver }
	if err := sqlstore.MigrateSQLite(ctx, h, boom, m); !errors.Is(err, errRiver) {
		t.Fatalf("err = %v", err)
	}
	if err := h.QueryRowContext(ctx, `SELECT 1 FROM e_migrations`).Scan(new(int)); err == nil || err == sql.ErrNoRows {
		t.Fatalf("the version table exists after first failed: %v", err)
	}
	pool := openPostgres(t)
	if err := sqlstore.MigratePostgres(ctx, pool, boom, m); !errors.Is(err, errRiver) {
		t.Fatalf("err = %v", err)
	}
}

// A URL that does not parse is named without being quoted: it may hold the
// password.
func TestOpenPostgresErrorHidesTheURL(t *testing.T) {
	_, err := sqlstore.OpenPostgres(context.Background(), sqlstore.PostgresOptions{URL: "postgres://u:hunter2@host:notaport/db"})
	if err == nil || strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "DATABASE_URL") {
		t.Fatalf("err = %v", err)
	}
}

// The SQLite file is its owner's only, in WAL mode, with foreign keys on.
func TestOpenSQLiteIsOwnerOnlyWALWithForeignKeys(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "s.db")
	h, err := sqlstore.OpenSQLite(ctx, path, sqlstore.SQLiteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var mode string
	var fk int
	if err := h.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v", mode, err)
	}
	if err := h.QueryRowContext(ctx, `PRAGMA foreign_keys`).Scan(&fk); err != nil || fk != 1 {
		t.Fatalf("foreign_keys = %d, %v", fk, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != sqlitefile.Mode {
		t.Fatalf("mode %v, want %v", fi.Mode().Perm(), sqlitefile.Mode)
	}
}
