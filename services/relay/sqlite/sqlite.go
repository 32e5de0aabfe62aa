// Package sqlite is relay's Store on the embedded SQLite database (modernc,
// pure Go) that backup also uses when DATABASE_URL is empty, with River
// through riversqlite.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlstore"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/internal/sqltext"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river/riverdriver/riversqlite"
)

var _ relay.Store = (*Store)(nil)

// Store keeps relay's rows in one SQLite file.
type Store struct {
	db *sql.DB
	// river inserts and completes relay's jobs in this store's
	// transactions (NewQueue builds it).
	river relay.River[*sql.Tx]
}

// Open opens (creating) the database at path, with transactions that take
// the write lock when they begin: backup's connection writes the same file.
func Open(ctx context.Context, path string) (*Store, error) {
	db, err := sqlstore.OpenSQLite(ctx, path, sqlstore.SQLiteOptions{ImmediateTx: true})
	if err != nil {
		return nil, err
	}
	return &Store{db: db}, nil
}

// Kind is "sqlite".
func (s *Store) Kind() string { return "sqlite" }

// Ping checks the file opens.
func (s *Store) Ping(ctx context.Context) error { return sqlstore.PingSQLite(ctx, s.db) }

// Close closes the database.
func (s *Store) Close() { _ = s.db.Close() }

// Migrate runs River's migrations and relay's. Backup may be migrating the
// same file from its own connection at the same moment (blacksky run starts
// both); River's SQLite migrations then fail on the loser's side, and
// relay's start loop tries again.
func (s *Store) Migrate(ctx context.Context) error {
	river := func(ctx context.Context) error { return jobs.Migrate(ctx, riversqlite.New(s.db)) }
	return sqlstore.MigrateSQLite(ctx, s.db, river, sqlstore.Migrations{Table: sqltext.MigrationsTable, Steps: sqltext.SQLiteMigrations})
}

func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	return sqlstore.InTx(ctx, s.db, fn)
}

// InsertMessage stores m under the next seq, or finds it stored. SQLite
// has one writer at a time, so no concurrent insert can race it.
func (s *Store) InsertMessage(ctx context.Context, m relay.NewMessage, hook relay.RefInTx) (int64, bool, error) {
	var seq int64
	dup := false
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, sqltext.FindMessage, m.Session, m.Chat, m.WAID).Scan(&seq)
		if err == nil {
			dup = true
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		if err := tx.QueryRowContext(ctx, sqltext.NextSeq, m.Session).Scan(&seq); err != nil {
			return err
		}
		if err := tx.QueryRowContext(ctx, sqltext.InsertMessage, m.Session, seq, m.Chat, m.WAID, m.ReceivedAt.UnixMilli(), m.Payload).Scan(&seq); err != nil {
			return err
		}
		if hook != nil {
			return hook(ctx, s.river.Tx(tx), seq)
		}
		return nil
	})
	if err != nil {
		return 0, false, fmt.Errorf("store message: %w", err)
	}
	return seq, dup, nil
}

func scanStored(row interface{ Scan(...any) error }) (relay.Stored, error) {
	var st relay.Stored
	var ms int64
	err := row.Scan(&st.Ref, &st.Chat, &ms, &st.Payload)
	if errors.Is(err, sql.ErrNoRows) {
		return relay.Stored{}, relay.ErrNotFound
	}
	st.ReceivedAt = time.UnixMilli(ms).UTC()
	return st, err
}

// Message reads one message.
func (s *Store) Message(ctx context.Context, session string, seq int64) (relay.Stored, error) {
	st, err := scanStored(s.db.QueryRowContext(ctx, sqltext.GetMessage, session, seq))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return st, fmt.Errorf("read message %d: %w", seq, err)
	}
	return st, err
}

// Messages reads messages after a seq.
func (s *Store) Messages(ctx context.Context, session string, afterSeq int64, limit int) ([]relay.Stored, error) {
	rows, err := s.db.QueryContext(ctx, sqltext.ListMessages, session, afterSeq, limit)
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	defer rows.Close()
	var list []relay.Stored
	for rows.Next() {
		st, err := scanStored(rows)
		if err != nil {
			return nil, fmt.Errorf("list messages: %w", err)
		}
		list = append(list, st)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	return list, nil
}

// InsertReceipt stores a receipt once.
func (s *Store) InsertReceipt(ctx context.Context, r relay.NewReceipt, hook relay.RefInTx) (int64, bool, error) {
	var id int64
	dup := false
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, sqltext.InsertReceipt, r.Session, r.Dedup, r.Chat, r.ReceivedAt.UnixMilli(), r.Payload).Scan(&id)
		if errors.Is(err, sql.ErrNoRows) {
			dup = true
			return tx.QueryRowContext(ctx, sqltext.FindReceipt, r.Session, r.Dedup).Scan(&id)
		}
		if err != nil {
			return err
		}
		if hook != nil {
			return hook(ctx, s.river.Tx(tx), id)
		}
		return nil
	})
	if err != nil {
		return 0, false, fmt.Errorf("store receipt: %w", err)
	}
	return id, dup, nil
}

// Receipt reads one receipt.
func (s *Store) Receipt(ctx context.Context, session string, id int64) (relay.Stored, error) {
	st, err := scanStored(s.db.QueryRowContext(ctx, sqltext.GetReceipt, session, id))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return st, fmt.Errorf("read receipt %d: %w", id, err)
	}
	return st, err
}

func scanSend(row *sql.Row) (relay.Send, error) {
	var sd relay.Send
	var created, sent, finished int64
	err := row.Scan(&sd.Key, &sd.State, &created, &sd.Payload, &sd.Outcome.WAID, &sent, &sd.Outcome.Error, &finished)
	if errors.Is(err, sql.ErrNoRows) {
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
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var ms int64
		err := tx.QueryRowContext(ctx, sqltext.InsertSend, session, key, createdAt.UnixMilli(), payload).Scan(&ms)
		if errors.Is(err, sql.ErrNoRows) {
			sd, err = scanSend(tx.QueryRowContext(ctx, sqltext.GetSend, session, key))
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
	sd, err := scanSend(s.db.QueryRowContext(ctx, sqltext.GetSend, session, key))
	if err != nil && !errors.Is(err, relay.ErrNotFound) {
		return sd, fmt.Errorf("read send: %w", err)
	}
	return sd, err
}

// FinishSend records a queued send's outcome.
func (s *Store) FinishSend(ctx context.Context, session, key string, o relay.Outcome, hook relay.InTx) (bool, error) {
	changed := false
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, sqltext.FinishSend, session, key, o.State, o.WAID, relay.UnixMilli(o.SentAt), o.Error, o.FinishedAt.UnixMilli())
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
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
	if err := s.db.QueryRowContext(ctx, sqltext.CountQueuedSends, session).Scan(&n); err != nil {
		return 0, fmt.Errorf("count sends: %w", err)
	}
	return n, nil
}

// QueuedSendKeys lists the keys of queued sends, oldest first.
func (s *Store) QueuedSendKeys(ctx context.Context, session string) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, sqltext.QueuedSendKeys, session)
	if err != nil {
		return nil, fmt.Errorf("queued sends: %w", err)
	}
	defer rows.Close()
	var keys []string
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			return nil, fmt.Errorf("queued sends: %w", err)
		}
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("queued sends: %w", err)
	}
	return keys, nil
}

// Prune deletes what is older than cutoff.
func (s *Store) Prune(ctx context.Context, session string, cutoff time.Time) (int64, error) {
	var n int64
	for _, q := range []string{sqltext.PruneMessages, sqltext.PruneReceipts, sqltext.PruneSends} {
		res, err := s.db.ExecContext(ctx, q, session, cutoff.UnixMilli())
		if err != nil {
			return n, fmt.Errorf("prune: %w", err)
		}
		k, _ := res.RowsAffected()
		n += k
	}
	return n, nil
}

// Stats reads the heartbeat's figures.
func (s *Store) Stats(ctx context.Context, session string) (relay.Stats, error) {
	var st relay.Stats
	if err := s.db.QueryRowContext(ctx, sqltext.MessageStats, session).Scan(&st.LastSeq, &st.Stored); err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	if err := s.db.QueryRowContext(ctx, sqltext.LastSeq, session).Scan(&st.LastSeq); err != nil && !errors.Is(err, sql.ErrNoRows) {
		return st, fmt.Errorf("stats: %w", err)
	}
	var err error
	if st.QueuedSends, err = s.CountQueuedSends(ctx, session); err != nil {
		return st, err
	}
	rows, err := s.db.QueryContext(ctx, sqltext.SQLiteJobStats, session)
	if err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var c relay.JobCount
		if err := rows.Scan(&c.Kind, &c.State, &c.Count, &c.OldestMS); err != nil {
			return st, fmt.Errorf("stats: %w", err)
		}
		st.Jobs = append(st.Jobs, c)
	}
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("stats: %w", err)
	}
	return st, nil
}

// NewQueue builds River on this database.
func (s *Store) NewQueue(cfg relay.QueueConfig) (relay.Queue, error) {
	if cfg.PollInterval == 0 {
		// No LISTEN/NOTIFY in SQLite: local inserts wake the producer;
		// jobs inserted by another process are found by polling.
		cfg.PollInterval = time.Second
	}
	return s.river.NewQueue(riversqlite.New(s.db), cfg)
}
