package wastore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
)

// Writer keeps committing numbered rows (1, 2, 3, ...) into a store, one transaction each, in its own connection,
// like the gateway does while a snapshot is being taken. Each transaction also rewrites a Signal session row, so
// the write touches pages all over the file and not only the end of one table. Last tells how far it got.
type Writer struct {
	db     *sql.DB
	cancel context.CancelFunc
	done   chan struct{}
	last   atomic.Int64
	err    error // set before done is closed
}

// writesTable holds the Writer's rows. Its name is not whatsmeow's, so it can never clash with the real schema.
const writesTable = "wastore_writes"

// StartWriter opens path and starts committing rows until ctx is cancelled or Stop is called.
func StartWriter(ctx context.Context, path string) (*Writer, error) {
	db, err := openRW(path)
	if err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+writesTable+` (n INTEGER PRIMARY KEY, payload BLOB NOT NULL)`); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("start writer: %w", err)
	}
	var start int64
	if err := db.QueryRowContext(ctx, `SELECT coalesce(max(n), 0) FROM `+writesTable).Scan(&start); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("start writer: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	w := &Writer{db: db, cancel: cancel, done: make(chan struct{})}
	w.last.Store(start)
	go w.run(ctx, start)
	return w, nil
}

func (w *Writer) run(ctx context.Context, n int64) {
	defer close(w.done)
	rng := rand.New(rand.NewChaCha8(seed(uint64(n))))
	for ctx.Err() == nil {
		n++
		if err := w.commit(ctx, n, rng); err != nil {
			if ctx.Err() == nil {
				w.err = err
			}
			return
		}
		w.last.Store(n)
	}
}

func (w *Writer) commit(ctx context.Context, n int64, rng *rand.Rand) (err error) {
	tx, err := w.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("writer: begin: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+writesTable+` (n, payload) VALUES (?, ?)`, n, randBytes(rng, 64+rng.IntN(512))); err != nil {
		return fmt.Errorf("writer: insert %d: %w", n, err)
	}
	// Ratchet a random session forward, as decrypting a message does. A store without sessions just skips it.
	if _, err := tx.ExecContext(ctx,
		`UPDATE whatsmeow_sessions SET session = ? WHERE rowid = (SELECT rowid FROM whatsmeow_sessions LIMIT 1 OFFSET ?)`,
		randBytes(rng, 1000+rng.IntN(4000)), rng.IntN(1000)); err != nil && !isNoSuchTable(err) {
		return fmt.Errorf("writer: update session: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("writer: commit %d: %w", n, err)
	}
	return nil
}

func isNoSuchTable(err error) bool {
	return err != nil && strings.Contains(strings.ToLower(err.Error()), "no such table")
}

// Last is the number of the last committed row (0 before the first commit of a new store).
func (w *Writer) Last() int64 { return w.last.Load() }

// Done is closed when the writer has stopped (Stop, ctx cancelled or an error).
func (w *Writer) Done() <-chan struct{} { return w.done }

// Stop stops the writer, waits for it, closes its connection and returns the last committed number and the error
// that stopped it early, if any.
func (w *Writer) Stop() (int64, error) {
	w.cancel()
	<-w.done
	return w.last.Load(), errors.Join(w.err, w.db.Close())
}

// Writes reports the Writer's rows in the store at path: how many there are and the highest number. A store holding
// a committed prefix of the writes has count == max.
func Writes(ctx context.Context, path string) (count, maxN int64, err error) {
	db, err := openRW(path)
	if err != nil {
		return 0, 0, err
	}
	defer func() { err = errors.Join(err, db.Close()) }()
	err = db.QueryRowContext(ctx, `SELECT count(*), coalesce(max(n), 0) FROM `+writesTable).Scan(&count, &maxN)
	if err != nil {
		return 0, 0, fmt.Errorf("read writes: %w", err)
	}
	return count, maxN, nil
}
