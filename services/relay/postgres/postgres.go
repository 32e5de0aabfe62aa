// Package postgres is relay's Store on PostgreSQL (pgx pool), with River
// through riverpgxv5: the same database as backup (DATABASE_URL).
package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlstore"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/internal/sqltext"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
)

var _ relay.Store = (*Store)(nil)

// Options configure Open.
type Options struct {
	// URL is config.PostgresURL(): Heroku's sslmode rule already applied.
	URL      string
	MaxConns int
	// Tracer, when set, sees every query and acquire of the pool (a
	// dboutage.Outage: it hears of an outage before River logs it).
	Tracer pgx.QueryTracer
}

// Store keeps relay's rows in PostgreSQL.
type Store struct {
	pool *pgxpool.Pool
	// river inserts and completes relay's jobs in this store's
	// transactions (NewQueue builds it).
	river relay.River[pgx.Tx]
}

// Open connects and pings; the error never shows the URL's password.
func Open(ctx context.Context, opts Options) (*Store, error) {
	pool, err := sqlstore.OpenPostgres(ctx, sqlstore.PostgresOptions{URL: opts.URL, MaxConns: opts.MaxConns, Tracer: opts.Tracer})
	if err != nil {
		return nil, err
	}
	return &Store{pool: pool}, nil
}

// Kind is "postgres".
func (s *Store) Kind() string { return "postgres" }

// Ping checks the server answers.
func (s *Store) Ping(ctx context.Context) error { return sqlstore.PingPostgres(ctx, s.pool) }

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

// Migrate runs River's migrations and relay's under the advisory lock
// backup's migrations take too: River's must not run twice at once,
// whichever service starts them.
func (s *Store) Migrate(ctx context.Context) error {
	river := func(ctx context.Context) error { return jobs.Migrate(ctx, riverpgxv5.New(s.pool)) }
	return sqlstore.MigratePostgres(ctx, s.pool, river, sqlstore.Migrations{Table: sqltext.MigrationsTable, Steps: sqltext.PostgresMigrations})
}

// errRaced is an insert that lost to a concurrent insert of the same item:
// the transaction is rolled back (its seq given back) and started over,
// which then finds the winner's row.
var errRaced = errors.New("raced")

// InsertMessage stores m under the next seq, or finds it stored.
func (s *Store) InsertMessage(ctx context.Context, m relay.NewMessage, hook relay.RefInTx) (int64, bool, error) {
	for range 3 {
		var seq int64
		dup := false
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			err := tx.QueryRow(ctx, sqltext.FindMessage, m.Session, m.Chat, m.WAID).Scan(&seq)
			if err == nil {
				dup = true
				return nil
			}
			if !errors.Is(err, pgx.ErrNoRows) {
				return err
			}
			err = tx.QueryRow(ctx, sqltext.PostgresInsertMessageSeq, m.Session, m.Chat, m.WAID, m.ReceivedAt.UnixMilli(), m.Payload).Scan(&seq)
			if errors.Is(err, pgx.ErrNoRows) {
				return errRaced
			}
			if err != nil {
				return err
			}
			if hook != nil {
				return hook(ctx, s.river.Tx(tx), seq)
			}
			return nil
		})
		if errors.Is(err, errRaced) {
			continue
		}
		if err != nil {
			return 0, false, fmt.Errorf("store message: %w", err)
		}
		return seq, dup, nil
	}
	return 0, false, errors.New("store message: lost the race for it three times")
}

func scanStored(row pgx.Row) (relay.Stored, error) {
	var st relay.Stored
	var ms int64
	err := row.Scan(&st.Ref, &st.Chat, &ms, &st.Payload)
	if errors.Is(err, pgx.ErrNoRows) {
		return relay.Stored{}, relay.ErrNotFound
	}
	st.ReceivedAt = time.UnixMilli(ms).UTC()
	return st, err
}

// Message reads one message.
func (s *Store) Message(ctx context.Context, session string, seq int64) (relay.Stored, error) {
	st, err := scanStored(s.pool.QueryRow(ctx, sqltext.GetMessage, session, seq))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return st, fmt.Errorf("read message %d: %w", seq, err)
	}
	return st, err
}

// Messages reads messages after a seq.
func (s *Store) Messages(ctx context.Context, session string, afterSeq int64, limit int) ([]relay.Stored, error) {
	rows, err := s.pool.Query(ctx, sqltext.ListMessages, session, afterSeq, limit)
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (relay.Stored, error) { return scanStored(r) })
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	return list, nil
}

// InsertReceipt stores a receipt once.
func (s *Store) InsertReceipt(ctx context.Context, r relay.NewReceipt, hook relay.RefInTx) (int64, bool, error) {
	for range 3 {
		var id int64
		dup := false
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			err := tx.QueryRow(ctx, sqltext.InsertReceipt, r.Session, r.Dedup, r.Chat, r.ReceivedAt.UnixMilli(), r.Payload).Scan(&id)
			if errors.Is(err, pgx.ErrNoRows) {
				dup = true
				return tx.QueryRow(ctx, sqltext.FindReceipt, r.Session, r.Dedup).Scan(&id)
			}
			if err != nil {
				return err
			}
			if hook != nil {
				return hook(ctx, s.river.Tx(tx), id)
			}
			return nil
		})
		if errors.Is(err, pgx.ErrNoRows) {
			continue // the winner of a race was not committed yet when read
		}
		if err != nil {
			return 0, false, fmt.Errorf("store receipt: %w", err)
		}
		return id, dup, nil
	}
	return 0, false, errors.New("store receipt: lost the race for it three times")
}

// Receipt reads one receipt.
func (s *Store) Receipt(ctx context.Context, session string, id int64) (relay.Stored, error) {
	st, err := scanStored(s.pool.QueryRow(ctx, sqltext.GetReceipt, session, id))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return st, fmt.Errorf("read receipt %d: %w", id, err)
	}
	return st, err
}

func scanSend(row pgx.Row) (relay.Send, error) {
	var sd relay.Send
	var created, sent, finished int64
	err := row.Scan(&sd.Key, &sd.State, &created, &sd.Payload, &sd.Outcome.WAID, &sent, &sd.Outcome.Error, &finished)
	if errors.Is(err, pgx.ErrNoRows) {
		return relay.Send{}, relay.ErrNotFound
	}
	if err != nil {
		return relay.Send{}, err
	}
	return relay.FillSend(sd, created, sent, finished), nil
}

// InsertSend queues a send unless its key is known.
func (s *Store) InsertSend(ctx context.Context, session, key string, createdAt time.Time, payload []byte, hook relay.InTx) (relay.Send, bool, error) {
	var sd relay.Send
	inserted := false
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var ms int64
		err := tx.QueryRow(ctx, sqltext.InsertSend, session, key, createdAt.UnixMilli(), payload).Scan(&ms)
		if errors.Is(err, pgx.ErrNoRows) {
			sd, err = scanSend(tx.QueryRow(ctx, sqltext.GetSend, session, key))
			return err
		}
		if err != nil {
			return err
		}
		inserted = true
		sd = relay.Send{Key: key, State: relay.SendQueued, CreatedAt: time.UnixMilli(ms).UTC(), Payload: payload}
		if hook != nil {
			return hook(ctx, s.river.Tx(tx))
		}
		return nil
	})
	if err != nil {
		return relay.Send{}, false, fmt.Errorf("queue send: %w", err)
	}
	return sd, inserted, nil
}

// GetSend reads one send.
func (s *Store) GetSend(ctx context.Context, session, key string) (relay.Send, error) {
	sd, err := scanSend(s.pool.QueryRow(ctx, sqltext.GetSend, session, key))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return sd, fmt.Errorf("read send: %w", err)
	}
	return sd, err
}

// FinishSend records a queued send's outcome.
func (s *Store) FinishSend(ctx context.Context, session, key string, o relay.Outcome, hook relay.InTx) (bool, error) {
	changed := false
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, sqltext.FinishSend, session, key, o.State, o.WAID, relay.UnixMilli(o.SentAt), o.Error, o.FinishedAt.UnixMilli())
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		changed = true
		if hook != nil {
			return hook(ctx, s.river.Tx(tx))
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("record send outcome: %w", err)
	}
	return changed, nil
}

// CountQueuedSends counts queued sends.
func (s *Store) CountQueuedSends(ctx context.Context, session string) (int64, error) {
	var n int64
	if err := s.pool.QueryRow(ctx, sqltext.CountQueuedSends, session).Scan(&n); err != nil {
		return 0, fmt.Errorf("count sends: %w", err)
	}
	return n, nil
}

// QueuedSendKeys lists the keys of queued sends, oldest first.
func (s *Store) QueuedSendKeys(ctx context.Context, session string) ([]string, error) {
	rows, err := s.pool.Query(ctx, sqltext.QueuedSendKeys, session)
	if err != nil {
		return nil, fmt.Errorf("queued sends: %w", err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("queued sends: %w", err)
	}
	return keys, nil
}

// Prune deletes what is older than cutoff.
func (s *Store) Prune(ctx context.Context, session string, cutoff time.Time) (int64, error) {
	var n int64
	for _, q := range []string{sqltext.PruneMessages, sqltext.PruneReceipts, sqltext.PruneSends} {
		tag, err := s.pool.Exec(ctx, q, session, cutoff.UnixMilli())
		if err != nil {
			return n, fmt.Errorf("prune: %w", err)
		}
		n += tag.RowsAffected()
	}
	return n, nil
}

// Stats reads the heartbeat's figures.
func (s *Store) Stats(ctx context.Context, session string) (relay.Stats, error) {
	var st relay.Stats
	if err := s.pool.QueryRow(ctx, sqltext.MessageStats, session).Scan(&st.LastSeq, &st.Stored); err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	if err := s.pool.QueryRow(ctx, sqltext.LastSeq, session).Scan(&st.LastSeq); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return st, fmt.Errorf("stats: %w", err)
	}
	var err error
	if st.QueuedSends, err = s.CountQueuedSends(ctx, session); err != nil {
		return st, err
	}
	rows, err := s.pool.Query(ctx, sqltext.PostgresJobStats, session)
	if err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	st.Jobs, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (relay.JobCount, error) {
		var c relay.JobCount
		err := r.Scan(&c.Kind, &c.State, &c.Count, &c.OldestMS)
		return c, err
	})
	if err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	return st, nil
}

// NewQueue builds River on this pool.
func (s *Store) NewQueue(cfg relay.QueueConfig) (relay.Queue, error) {
	return s.river.NewQueue(riverpgxv5.New(s.pool), cfg)
}
