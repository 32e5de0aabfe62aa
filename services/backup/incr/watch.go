package incr

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
)

// WatcherOptions configure a Watcher. Zero fields take their defaults.
type WatcherOptions struct {
	// Interval between polls of PRAGMA data_version (default 50ms): the bound on how late a commit is noticed.
	Interval time.Duration
	Clock    clockwork.Clock
	Log      *slog.Logger
}

// Watcher notices commits to the store from its own connection: SQLite changes PRAGMA data_version on a connection
// whenever another connection or process commits, and polling it costs a read of the WAL index (microseconds). It
// also keeps the age of the oldest commit not yet shipped, for the replication lag metric. A commit's time is when
// it was noticed, at most one Interval after it happened.
type Watcher struct {
	db       *sql.DB
	conn     *sql.Conn
	clock    clockwork.Clock
	interval time.Duration
	log      *slog.Logger
	changes  chan struct{}

	mu        sync.Mutex
	version   int64
	n         uint64      // commits noticed (polls that saw data_version move)
	unshipped []detection // the first commit noticed after each outstanding Mark; [0] is the oldest unshipped
	marked    bool        // Shipping was called since the last entry of unshipped
}

type detection struct {
	n  uint64
	at time.Time
}

// Mark is what a capture covers: every commit noticed before Shipping returned it.
type Mark struct{ n uint64 }

// NewWatcher opens its own connection to the store at path. Commits before NewWatcher are not reported: the caller
// ships a point at start anyway.
func NewWatcher(ctx context.Context, path string, opts WatcherOptions) (_ *Watcher, err error) {
	if opts.Interval <= 0 {
		opts.Interval = 50 * time.Millisecond
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("incr: watch session store: %w", err)
	}
	db, err := sql.Open("sqlite", sqlitefile.URI(path, url.Values{"mode": {"ro"}, "_pragma": {"busy_timeout(10000)"}}))
	if err != nil {
		return nil, fmt.Errorf("incr: watch session store: %w", err)
	}
	w := &Watcher{db: db, clock: opts.Clock, interval: opts.Interval, log: opts.Log, changes: make(chan struct{}, 1)}
	defer func() {
		if err != nil {
			_ = w.Close()
		}
	}()
	if w.conn, err = db.Conn(ctx); err != nil {
		return nil, fmt.Errorf("incr: watch session store: %w", err)
	}
	if w.version, err = w.dataVersion(ctx); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *Watcher) dataVersion(ctx context.Context) (int64, error) {
	var v int64
	if err := w.conn.QueryRowContext(ctx, "PRAGMA data_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("incr: data_version: %w", err)
	}
	return v, nil
}

// Run polls until ctx ends. The caller owns the goroutine that runs it and waits for it before Close.
func (w *Watcher) Run(ctx context.Context) error {
	t := w.clock.NewTicker(w.interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		}
		v, err := w.dataVersion(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !failing {
				w.log.Warn("incremental backup: cannot poll the session store", "err", err)
			}
			failing = true
			continue
		}
		failing = false
		w.mu.Lock()
		moved := v != w.version
		if moved {
			w.version = v
			w.n++
			if len(w.unshipped) == 0 || w.marked {
				w.unshipped = append(w.unshipped, detection{n: w.n, at: w.clock.Now()})
				w.marked = false
			}
		}
		w.mu.Unlock()
		if moved {
			select {
			case w.changes <- struct{}{}:
			default: // a signal is already pending: commits coalesce
			}
		}
	}
}

// Changes receives a value after one or more commits were noticed.
func (w *Watcher) Changes() <-chan struct{} { return w.changes }

// Shipping is called as a capture starts: the point it takes covers every commit noticed so far.
func (w *Watcher) Shipping() Mark {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.marked = true
	return Mark{n: w.n}
}

// Shipped is called once the point of a capture started at m is durable.
func (w *Watcher) Shipped(m Mark) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := 0
	for i < len(w.unshipped) && w.unshipped[i].n <= m.n {
		i++
	}
	w.unshipped = w.unshipped[i:]
}

// Lag is the age of the oldest commit noticed and not yet shipped, or zero.
func (w *Watcher) Lag() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.unshipped) == 0 {
		return 0
	}
	return w.clock.Since(w.unshipped[0].at)
}

// Close closes the connection. Run must have returned.
func (w *Watcher) Close() error {
	if w.conn != nil {
		_ = w.conn.Close()
	}
	return w.db.Close()
}
