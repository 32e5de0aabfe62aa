package health

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"riverqueue.com/riverui"
)

// RiverUI is River's web UI for the backup jobs, over its own small pgx pool
// and an insert-only River client (no queues: it never works jobs).
type RiverUI struct {
	pool    *pgxpool.Pool
	handler *riverui.Handler
}

var _ Mount = (*RiverUI)(nil)

// RiverUIPrefix is where the UI is mounted.
const RiverUIPrefix = "/riverui"

// NewRiverUI builds the UI for the PostgreSQL database at dsn. The pool
// connects lazily, so a database that is down now does not stop the health
// service from starting; while it is down, log gets one line when it goes
// and one when it is back (package dboutage), not River UI's error every
// 10 s.
func NewRiverUI(dsn string, maxConns int32, log *slog.Logger) (*RiverUI, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx errors can quote the DSN; say only what is wrong.
		return nil, fmt.Errorf("river ui: DATABASE_URL is not a valid PostgreSQL URL")
	}
	if maxConns > 0 {
		pc.MaxConns = maxConns
	}
	out := dboutage.New(log, "river ui")
	pc.ConnConfig.Tracer = out
	log = out.Logger()
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		return nil, fmt.Errorf("river ui: pool: %w", err)
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: log})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("river ui: client: %w", err)
	}
	h, err := riverui.NewHandler(&riverui.HandlerOpts{
		Endpoints: riverui.NewEndpoints(client, nil),
		Logger:    log,
		Prefix:    RiverUIPrefix,
		// Job args of a snapshot job are small, but hide them by default all
		// the same: the UI is for seeing jobs move, not their payloads.
		JobListHideArgsByDefault: true,
	})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("river ui: handler: %w", err)
	}
	return &RiverUI{pool: pool, handler: h}, nil
}

// Start starts the UI's background services; they stop when ctx ends.
func (u *RiverUI) Start(ctx context.Context) error { return u.handler.Start(ctx) }

// ServeHTTP serves the UI and its API under RiverUIPrefix.
func (u *RiverUI) ServeHTTP(w http.ResponseWriter, r *http.Request) { u.handler.ServeHTTP(w, r) }

// Close releases the pool.
func (u *RiverUI) Close() { u.pool.Close() }
