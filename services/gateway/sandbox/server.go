package sandbox

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/jonboulle/clockwork"

	_ "modernc.org/sqlite" // the pure-Go "sqlite" driver
)

// ServerOptions configure OpenServer.
type ServerOptions struct {
	// Path of the server file, normally $DATA_DIR/sandbox.db.
	Path string
	// Seed makes ids, keys and timing repeat (SANDBOX_SEED). Empty: the
	// seed the file already holds, or a new random one stored in it.
	Seed  string
	Clock clockwork.Clock // nil: real clock
	Log   *slog.Logger
}

// Server is WhatsApp's side of the sandbox: the accounts it has linked, the
// contacts it simulates, messages not yet acknowledged, every message the
// bot sent and the receipts contacts send for them, in its own SQLite file. One per process; the gateway's Conns
// (Open) attach to it one at a time.
type Server struct {
	db     *sql.DB
	clock  clockwork.Clock
	log    *slog.Logger
	seed   *seeder
	seedID string
	onSent atomic.Pointer[func(Sent)]
	// version is what the client presents at login (version.go).
	version presented

	mu      sync.Mutex
	client  *Client // the Conn attached now, or nil
	hang    chan struct{}
	failN   int // connect attempts still to fail
	failRes Fault
	refuse  string // send refusal kind
	refuseN int
}

// schema is the server file. Times are Unix nanoseconds. receipts are
// what contacts' phones say about the bot's sends (ids a JSON array, type
// whatsmeow's ReceiptType), queued and acknowledged like the inbox.
const schema = `
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (jid TEXT PRIMARY KEY, state TEXT NOT NULL, linked_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS prekeys (device TEXT NOT NULL, key_id INTEGER NOT NULL, PRIMARY KEY (device, key_id));
CREATE TABLE IF NOT EXISTS contacts (phone TEXT PRIMARY KEY, push_name TEXT NOT NULL, first_seen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (
	seq INTEGER PRIMARY KEY,
	id TEXT NOT NULL UNIQUE,
	chat TEXT NOT NULL,
	sender TEXT NOT NULL,
	push_name TEXT NOT NULL,
	type TEXT NOT NULL,
	body TEXT NOT NULL,
	sent_at INTEGER NOT NULL,
	deliver_at INTEGER NOT NULL,
	deliveries INTEGER NOT NULL DEFAULT 0,
	acked_at INTEGER,
	device TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS inbox_unacked ON inbox (deliver_at, seq) WHERE acked_at IS NULL;
CREATE TABLE IF NOT EXISTS outbox (
	seq INTEGER PRIMARY KEY,
	id TEXT NOT NULL,
	to_jid TEXT NOT NULL,
	text TEXT NOT NULL,
	at INTEGER NOT NULL,
	refused TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_id ON outbox (id);
CREATE TABLE IF NOT EXISTS receipts (
	seq INTEGER PRIMARY KEY,
	ids TEXT NOT NULL,
	chat TEXT NOT NULL,
	type TEXT NOT NULL,
	at INTEGER NOT NULL,
	deliver_at INTEGER NOT NULL,
	deliveries INTEGER NOT NULL DEFAULT 0,
	acked_at INTEGER,
	device TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_unacked ON receipts (deliver_at, seq) WHERE acked_at IS NULL;
`

// serverDSN: WAL with synchronous=NORMAL survives a killed process (the
// committed transaction is in the WAL file, in the OS's hands); it is the
// machine crashing that it does not cover, which a test stand-in need not.
func serverDSN(path string) string {
	return sqlitefile.URI(path, url.Values{"_pragma": {"journal_mode(WAL)", "synchronous(NORMAL)", "busy_timeout(10000)"}})
}

// OpenServer opens (creating, mode 0600) the server file.
func OpenServer(ctx context.Context, o ServerOptions) (*Server, error) {
	if o.Path == "" {
		return nil, errors.New("sandbox: no server path")
	}
	if err := os.MkdirAll(filepath.Dir(o.Path), 0o700); err != nil {
		return nil, fmt.Errorf("sandbox: create data dir: %w", err)
	}
	if err := sqlitefile.Prepare(o.Path); err != nil {
		return nil, fmt.Errorf("sandbox: server file: %w", err)
	}
	db, err := sql.Open("sqlite", serverDSN(o.Path))
	if err != nil {
		return nil, fmt.Errorf("sandbox: open server file: %w", err)
	}
	db.SetMaxOpenConns(1) // one writer; keeps every transaction in order
	if _, err := db.ExecContext(ctx, schema); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("sandbox: server schema: %w", err)
	}
	if err := addInboxDevice(ctx, db); err != nil {
		_ = db.Close()
		return nil, err
	}
	s := &Server{db: db, clock: o.Clock, log: o.Log}
	if s.clock == nil {
		s.clock = clockwork.NewRealClock()
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	seed, boot, err := s.boot(ctx, o.Seed)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	s.seed, s.seedID = newSeeder(seed, boot), seed
	return s, nil
}

// addInboxDevice gives a server file from before messages were tied to a
// device its inbox.device column; its rows (device empty) go to whichever device is
// linked.
func addInboxDevice(ctx context.Context, db *sql.DB) error {
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('inbox') WHERE name = 'device'`).Scan(&n); err != nil {
		return fmt.Errorf("sandbox: server schema: %w", err)
	}
	if n == 0 {
		if _, err := db.ExecContext(ctx, `ALTER TABLE inbox ADD COLUMN device TEXT NOT NULL DEFAULT ''`); err != nil {
			return fmt.Errorf("sandbox: server schema: %w", err)
		}
	}
	return nil
}

// boot counts this start and settles the seed: the one given, else the
// stored one, else a new random one (stored, so a restart repeats it).
func (s *Server) boot(ctx context.Context, seed string) (string, uint64, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return "", 0, fmt.Errorf("sandbox: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	stored, _ := getMeta(ctx, tx, "seed")
	if seed == "" {
		seed = stored
	}
	if seed == "" {
		var b [8]byte
		_, _ = rand.Read(b[:])
		seed = hex.EncodeToString(b[:])
	}
	bootS, _ := getMeta(ctx, tx, "boots")
	boot, _ := strconv.ParseUint(bootS, 10, 64)
	boot++
	if err := putMeta(ctx, tx, "seed", seed); err != nil {
		return "", 0, err
	}
	if err := putMeta(ctx, tx, "boots", strconv.FormatUint(boot, 10)); err != nil {
		return "", 0, err
	}
	if err := tx.Commit(); err != nil {
		return "", 0, fmt.Errorf("sandbox: %w", err)
	}
	return seed, boot, nil
}

// Seed is the seed in use; start the sandbox with it to repeat a run.
func (s *Server) Seed() string { return s.seedID }

type querier interface {
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
	ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error)
}

func getMeta(ctx context.Context, q querier, k string) (string, error) {
	var v string
	err := q.QueryRowContext(ctx, `SELECT v FROM meta WHERE k = ?`, k).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return v, err
}

func putMeta(ctx context.Context, q querier, k, v string) error {
	if _, err := q.ExecContext(ctx, `INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v`, k, v); err != nil {
		return fmt.Errorf("sandbox: write server state: %w", err)
	}
	return nil
}

// OnSent sets the function told about every send (P.sandbox.out).
func (s *Server) OnSent(f func(Sent)) { s.onSent.Store(&f) }

// Close closes the server file. Close the Conns first.
func (s *Server) Close() error { return s.db.Close() }

func (s *Server) attach(c *Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.client = c
}

func (s *Server) detach(c *Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == c {
		s.client = nil
	}
}

func (s *Server) current() *Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.client
}

// takeDialFault says what the next dial meets: a hang (the channel closes
// on release), a connect failure, or nothing.
func (s *Server) takeDialFault() (hang chan struct{}, fail *Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hang != nil {
		return s.hang, nil
	}
	if s.failN > 0 {
		s.failN--
		f := s.failRes
		return nil, &f
	}
	return nil, nil
}
