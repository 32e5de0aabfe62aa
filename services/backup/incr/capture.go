package incr

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"sync"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

var (
	// ErrNoChange is Delta's answer when no page differs from the parent: the parent still describes the store.
	ErrNoChange = errors.New("incr: no page changed since the parent point")
	// ErrUnknownParent means Delta was asked for a delta on a point the Capturer holds no page hashes for (not one
	// of the last two it captured, nor the one Resume rebuilt): take a base, or Resume from the chain first.
	ErrUnknownParent = errors.New("incr: the parent point is not known to this capturer")
	// ErrNotWAL means the store is not in WAL mode: the Capturer needs the WAL to find changed pages and to read
	// without blocking the gateway.
	ErrNotWAL = errors.New("incr: the session store is not in WAL mode")
)

// Options configure a Capturer. The zero value of each field means its default.
type Options struct {
	// Key is SESSION_ENCRYPTION_KEY (32 bytes), or nil for plaintext points.
	Key []byte
	// Pieces is asked which pieces are already stored, so they are neither sealed nor returned again.
	Pieces PieceChecker
	// CheckpointFrames: a delta that finds more frames than this in the WAL checkpoints it (default 1000, SQLite's
	// own wal_autocheckpoint).
	CheckpointFrames int64
	Log              *slog.Logger
	Clock            clockwork.Clock
}

// SealedPiece is a piece ready to store: its id and its bsnap/1 bytes.
type SealedPiece struct {
	ID   Hash
	Data []byte
}

// Point is a captured point: its manifest (sealed and decoded) and the pieces the PieceStore did not hold yet. The
// caller stores the pieces first (Store does), then records the manifest: a point is visible only once all its
// pieces are.
type Point struct {
	Manifest Manifest
	Sealed   []byte
	Pieces   []SealedPiece
	// Reused counts the pieces the store already held (identical content, stored once).
	Reused int
	// FullRead says every page was read to find the changes: a base, the first delta after Open or Resume, or a
	// delta after the WAL was checkpointed by someone else.
	FullRead bool
}

// StoredBytes is what the point adds to storage: its sealed manifest and new pieces.
func (p *Point) StoredBytes() int64 {
	n := int64(len(p.Sealed))
	for _, pc := range p.Pieces {
		n += int64(len(pc.Data))
	}
	return n
}

// Store puts the point's pieces into ps.
func (p *Point) Store(ctx context.Context, ps PiecePutter) error {
	for _, pc := range p.Pieces {
		if err := ps.Put(ctx, pc.ID, pc.Data); err != nil {
			return err
		}
	}
	return nil
}

// state is what the Capturer keeps about a point: the hash of every page and how far the WAL was read when it was
// taken.
type state struct {
	m        Manifest
	pageSize int
	hashes   []Hash
	pos      walPos
}

// Capturer takes points of one SQLite store. It holds three connections: a guard that keeps a read transaction
// open (so no other connection's checkpoint can restart the WAL before the Capturer has read it), one that takes the
// write lock for the few moments a consistent WAL end is needed, and one that checkpoints. Methods are serialised.
type Capturer struct {
	path, wal string
	opts      Options
	db        *sql.DB
	guard     *sql.Conn
	lock      *sql.Conn
	ckpt      *sql.Conn

	mu         sync.Mutex
	last, prev *state
}

// Open binds a Capturer to the store at path, which must exist and be in WAL mode.
func Open(ctx context.Context, path string, opts Options) (_ *Capturer, err error) {
	if opts.CheckpointFrames <= 0 {
		opts.CheckpointFrames = 1000
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Key != nil && len(opts.Key) != snapshot.KeySize {
		return nil, fmt.Errorf("incr: %w, got %d", snapshot.ErrBadKey, len(opts.Key))
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("incr: session store: %w", err)
	}
	db, err := sql.Open("sqlite", sqlitefile.URI(path, url.Values{"_pragma": {"busy_timeout(10000)"}}))
	if err != nil {
		return nil, fmt.Errorf("incr: open session store: %w", err)
	}
	c := &Capturer{path: path, wal: path + "-wal", opts: opts, db: db}
	defer func() {
		if err != nil {
			_ = c.Close()
		}
	}()
	var mode string
	if err := db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return nil, fmt.Errorf("incr: journal mode: %w", err)
	}
	if mode != "wal" {
		return nil, fmt.Errorf("%w (journal_mode is %s)", ErrNotWAL, mode)
	}
	for _, p := range []**sql.Conn{&c.guard, &c.lock, &c.ckpt} {
		if *p, err = db.Conn(ctx); err != nil {
			return nil, fmt.Errorf("incr: connection: %w", err)
		}
	}
	if err := c.beginGuard(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Close ends the guard transaction and closes the connections.
func (c *Capturer) Close() error {
	var errs []error
	if c.guard != nil {
		_, _ = c.guard.ExecContext(context.Background(), "ROLLBACK")
	}
	for _, cn := range []*sql.Conn{c.guard, c.lock, c.ckpt} {
		if cn != nil {
			errs = append(errs, cn.Close())
		}
	}
	errs = append(errs, c.db.Close())
	return errors.Join(errs...)
}

func (c *Capturer) beginGuard(ctx context.Context) error {
	if _, err := c.guard.ExecContext(ctx, "BEGIN"); err != nil {
		return fmt.Errorf("incr: begin guard: %w", err)
	}
	var n int
	if err := c.guard.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_schema").Scan(&n); err != nil {
		_, _ = c.guard.ExecContext(ctx, "ROLLBACK")
		return fmt.Errorf("incr: guard read: %w", err)
	}
	return nil
}

// pin takes the write lock, reads the WAL from from to its end, optionally reads the frames' pages (read) and
// checkpoints (ckpt), and moves the guard's read transaction to exactly that end. Holding the write lock is what
// makes the WAL's end the newest commit: nobody is half-way through one. It is held for a WAL scan, the changed
// pages and, at most once per CheckpointFrames, a checkpoint.
func (c *Capturer) pin(ctx context.Context, from walPos, read func(walScan) error, ckpt bool) (sc walScan, err error) {
	if _, err := c.lock.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return sc, fmt.Errorf("incr: take the write lock: %w", err)
	}
	defer func() {
		if _, rerr := c.lock.ExecContext(context.WithoutCancel(ctx), "ROLLBACK"); rerr != nil && err == nil {
			err = fmt.Errorf("incr: release the write lock: %w", rerr)
		}
	}()
	sc, err = scanWAL(c.wal, from)
	if err != nil {
		return sc, err
	}
	if read != nil {
		if err := read(sc); err != nil {
			return sc, err
		}
	}
	if _, err := c.guard.ExecContext(ctx, "ROLLBACK"); err != nil {
		return sc, fmt.Errorf("incr: end guard: %w", err)
	}
	if ckpt {
		sc.end.complete = c.checkpoint(ctx, sc.end)
	}
	if err := c.beginGuard(ctx); err != nil {
		return sc, err
	}
	return sc, nil
}

// checkpoint copies the WAL into the database file while the write lock is held and the guard released. It is
// complete when every frame was copied and the WAL held exactly the frames read: then the next writer restarts the
// WAL, and the new generation can be followed from its first frame.
func (c *Capturer) checkpoint(ctx context.Context, end walPos) bool {
	var busy, log, done int64
	if err := c.ckpt.QueryRowContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &log, &done); err != nil {
		c.opts.Log.Warn("incremental backup: checkpoint failed", "err", err)
		return false
	}
	return busy == 0 && log == end.frame && done == log
}

// readAll calls fn with every page of the guard's snapshot, in order.
func (c *Capturer) readAll(ctx context.Context, fn func(pageSize, pageCount int, pgno uint32, data []byte) error) error {
	var pageSize, pageCount int
	if err := c.guard.QueryRowContext(ctx, "PRAGMA page_size").Scan(&pageSize); err != nil {
		return fmt.Errorf("incr: page size: %w", err)
	}
	if err := c.guard.QueryRowContext(ctx, "PRAGMA page_count").Scan(&pageCount); err != nil {
		return fmt.Errorf("incr: page count: %w", err)
	}
	if int64(pageCount)*int64(pageSize) > MaxDBSize {
		return fmt.Errorf("incr: session store is %d bytes, over the %d-byte limit", int64(pageCount)*int64(pageSize), int64(MaxDBSize))
	}
	rows, err := c.guard.QueryContext(ctx, "SELECT pgno, data FROM sqlite_dbpage")
	if err != nil {
		return fmt.Errorf("incr: read pages: %w", err)
	}
	defer rows.Close()
	want := uint32(1)
	for rows.Next() {
		var pgno uint32
		var data sql.RawBytes
		if err := rows.Scan(&pgno, &data); err != nil {
			return fmt.Errorf("incr: read pages: %w", err)
		}
		if pgno != want || len(data) != pageSize {
			return fmt.Errorf("incr: read pages: page %d (%d bytes) where page %d of %d bytes was expected", pgno, len(data), want, pageSize)
		}
		want++
		if err := fn(pageSize, pageCount, pgno, data); err != nil {
			return err
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("incr: read pages: %w", err)
	}
	if int(want-1) != pageCount {
		return fmt.Errorf("incr: read %d pages of %d", want-1, pageCount)
	}
	return nil
}

// builder groups a point's pages into pieces and seals the ones the store lacks.
type builder struct {
	c        *Capturer
	ctx      context.Context
	pageSize int
	pt       *Point
	pending  []page
}

func (b *builder) add(pgno uint32, data []byte, hash Hash) {
	b.pending = append(b.pending, page{pgno: pgno, data: data})
	b.pt.Manifest.Pages = append(b.pt.Manifest.Pages, PageRef{Pgno: pgno, Piece: len(b.pt.Manifest.Pieces), Hash: hash})
}

// flush closes the current piece.
func (b *builder) flush() error {
	if len(b.pending) == 0 {
		return nil
	}
	plain := marshalPiece(b.pageSize, b.pending)
	id := Hash(sha256.Sum256(plain))
	b.pt.Manifest.Pieces = append(b.pt.Manifest.Pieces, PieceRef{ID: id, Pages: len(b.pending)})
	b.pending = b.pending[:0]
	if slices.ContainsFunc(b.pt.Pieces, func(p SealedPiece) bool { return p.ID == id }) {
		b.pt.Reused++
		return nil
	}
	if b.c.opts.Pieces != nil {
		has, err := b.c.opts.Pieces.Has(b.ctx, id)
		if err != nil {
			return fmt.Errorf("incr: look up piece: %w", err)
		}
		if has {
			b.pt.Reused++
			return nil
		}
	}
	sealed, _, err := snapshot.Encode(plain, b.c.opts.Key)
	if err != nil {
		return fmt.Errorf("incr: seal piece: %w", err)
	}
	b.pt.Pieces = append(b.pt.Pieces, SealedPiece{ID: id, Data: sealed})
	return nil
}

// finish fills in the manifest's remaining fields and seals it.
func (b *builder) finish(st *state) (*Point, error) {
	if err := b.flush(); err != nil {
		return nil, err
	}
	m := &b.pt.Manifest
	m.PageSize, m.PageCount = st.pageSize, len(st.hashes)
	m.DBHash = DBHash(st.pageSize, st.hashes)
	m.Created = b.c.opts.Clock.Now().UTC().Round(0)
	sealed, err := SealManifest(m, b.c.opts.Key)
	if err != nil {
		return nil, err
	}
	b.pt.Sealed = sealed
	st.m = *m
	return b.pt, nil
}
