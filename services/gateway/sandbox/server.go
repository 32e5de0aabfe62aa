package sandbox

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/jonboulle/clockwork"
	"go.mau.fi/whatsmeow/types"

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
// contacts it simulates, messages not yet acknowledged and every message the
// bot sent, in its own SQLite file. One per process; the gateway's Conns
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

// schema is the server file. Times are Unix nanoseconds.
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

// Device states in the server file.
const (
	deviceLinked    = "linked"
	deviceLoggedOut = "logged_out"
)

// deviceState is what the server knows of jid: linked, logged_out, or ""
// (never seen: a store restored onto a fresh server file).
func (s *Server) deviceState(ctx context.Context, jid types.JID) (string, error) {
	var st string
	err := s.db.QueryRowContext(ctx, `SELECT state FROM devices WHERE jid = ?`, jid.String()).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("sandbox: read device: %w", err)
	}
	return st, nil
}

func (s *Server) setDevice(ctx context.Context, jid types.JID, state string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO devices (jid, state, linked_at) VALUES (?, ?, ?)
		ON CONFLICT (jid) DO UPDATE SET state = excluded.state`, jid.String(), state, s.clock.Now().UnixNano())
	if err != nil {
		return fmt.Errorf("sandbox: write device: %w", err)
	}
	if state != deviceLoggedOut {
		return nil
	}
	// The device is gone: its pre-keys, and the messages queued for it
	// (a device linked later does not receive what was sent before).
	if _, err := s.db.ExecContext(ctx, `DELETE FROM prekeys WHERE device = ?`, jid.String()); err != nil {
		return fmt.Errorf("sandbox: drop the device's pre-keys: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `DELETE FROM inbox WHERE device = ?`, jid.String()); err != nil {
		return fmt.Errorf("sandbox: drop the device's messages: %w", err)
	}
	return nil
}

// linkedDevice is the device messages are sent to now: the one linked
// last and not logged out, or "" when none is.
func (s *Server) linkedDevice(ctx context.Context, q querier) (string, error) {
	var jid string
	err := q.QueryRowContext(ctx, `SELECT jid FROM devices WHERE state = ? ORDER BY rowid DESC LIMIT 1`, deviceLinked).Scan(&jid)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("sandbox: read devices: %w", err)
	}
	return jid, nil
}

// banned returns the ban in force: its code and how long it still lasts
// (zero: no stated expiry).
func (s *Server) banned(ctx context.Context) (code int, left time.Duration, on bool, err error) {
	untilS, err := getMeta(ctx, s.db, "ban_until")
	if err != nil || untilS == "" {
		return 0, 0, false, err
	}
	until, _ := strconv.ParseInt(untilS, 10, 64)
	codeS, _ := getMeta(ctx, s.db, "ban_code")
	code, _ = strconv.Atoi(codeS)
	now := s.clock.Now().UnixNano()
	if until <= now {
		return 0, 0, false, nil
	}
	explicit, _ := getMeta(ctx, s.db, "ban_stated")
	if explicit == "1" {
		left = time.Duration(until - now)
	}
	return code, left, true, nil
}

// Sent is one message the bot sent (or tried to: Refused says why not).
type Sent struct {
	ID        string
	To        string
	Text      string
	Timestamp time.Time
	Refused   string
}

// recordSent commits a send to the outbox, then tells OnSent.
func (s *Server) recordSent(ctx context.Context, m Sent) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO outbox (id, to_jid, text, at, refused) VALUES (?, ?, ?, ?, ?)`,
		m.ID, m.To, m.Text, m.Timestamp.UnixNano(), m.Refused)
	if err != nil {
		return fmt.Errorf("sandbox: record send: %w", err)
	}
	if f := s.onSent.Load(); f != nil && *f != nil {
		(*f)(m)
	}
	return nil
}

// Outbox returns the newest limit sends, oldest first.
func (s *Server) Outbox(ctx context.Context, limit int) ([]Sent, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, to_jid, text, at, refused FROM
		(SELECT * FROM outbox ORDER BY seq DESC LIMIT ?) ORDER BY seq`, limit)
	if err != nil {
		return nil, fmt.Errorf("sandbox: read outbox: %w", err)
	}
	defer rows.Close()
	var out []Sent
	for rows.Next() {
		var m Sent
		var at int64
		if err := rows.Scan(&m.ID, &m.To, &m.Text, &at, &m.Refused); err != nil {
			return nil, fmt.Errorf("sandbox: read outbox: %w", err)
		}
		m.Timestamp = time.Unix(0, at).UTC()
		out = append(out, m)
	}
	return out, rows.Err()
}

// takeRefusal consumes one armed send refusal.
func (s *Server) takeRefusal() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refuseN == 0 {
		return ""
	}
	s.refuseN--
	return s.refuse
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

// pending is one unacknowledged message.
type pending struct {
	seq       int64
	id        string
	chat      string
	sender    string
	pushName  string
	typ       string
	body      Content
	sentAt    time.Time
	deliverAt time.Time
}

// nextPending returns the first unacknowledged message for device after the cursor
// (by delivery time, then order of injection) that is due at now, or the
// time the next one falls due.
func (s *Server) nextPending(ctx context.Context, device types.JID, afterAt, afterSeq int64, now time.Time) (*pending, time.Time, error) {
	row := s.db.QueryRowContext(ctx, `SELECT seq, id, chat, sender, push_name, type, body, sent_at, deliver_at FROM inbox
		WHERE acked_at IS NULL AND device IN (?, '') AND (deliver_at > ? OR (deliver_at = ? AND seq > ?))
		ORDER BY deliver_at, seq LIMIT 1`, device.String(), afterAt, afterAt, afterSeq)
	var p pending
	var body string
	var sent, due int64
	err := row.Scan(&p.seq, &p.id, &p.chat, &p.sender, &p.pushName, &p.typ, &body, &sent, &due)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: read inbox: %w", err)
	}
	p.sentAt, p.deliverAt = time.Unix(0, sent).UTC(), time.Unix(0, due)
	if p.deliverAt.After(now) {
		return nil, p.deliverAt, nil
	}
	if err := json.Unmarshal([]byte(body), &p.body); err != nil {
		return nil, time.Time{}, fmt.Errorf("sandbox: inbox row %d: %w", p.seq, err)
	}
	return &p, time.Time{}, nil
}

func (s *Server) markDelivered(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE inbox SET deliveries = deliveries + 1 WHERE seq = ?`, seq)
	return err
}

func (s *Server) ack(ctx context.Context, seq int64) error {
	_, err := s.db.ExecContext(ctx, `UPDATE inbox SET acked_at = ? WHERE seq = ? AND acked_at IS NULL`, s.clock.Now().UnixNano(), seq)
	if err != nil {
		return fmt.Errorf("sandbox: ack: %w", err)
	}
	return nil
}

// Stats counts the server's messages.
type Stats struct {
	Unacked, Acked, Deliveries, Sent int64
}

// Stats reads the inbox and outbox counters.
func (s *Server) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := s.db.QueryRowContext(ctx, `SELECT
		(SELECT count(*) FROM inbox WHERE acked_at IS NULL),
		(SELECT count(*) FROM inbox WHERE acked_at IS NOT NULL),
		(SELECT coalesce(sum(deliveries), 0) FROM inbox),
		(SELECT count(*) FROM outbox)`).Scan(&st.Unacked, &st.Acked, &st.Deliveries, &st.Sent)
	if err != nil {
		return Stats{}, fmt.Errorf("sandbox: stats: %w", err)
	}
	return st, nil
}

// Deliveries is how often the message with id was handed to the gateway.
func (s *Server) Deliveries(ctx context.Context, id string) (n int, acked bool, err error) {
	var at sql.NullInt64
	err = s.db.QueryRowContext(ctx, `SELECT deliveries, acked_at FROM inbox WHERE id = ?`, id).Scan(&n, &at)
	return n, at.Valid, err
}

// uploadedPreKeys records the pre-key ids the device handed the server.
func (s *Server) uploadedPreKeys(ctx context.Context, device types.JID, ids []uint32) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	for _, id := range ids {
		if _, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO prekeys (device, key_id) VALUES (?, ?)`, device.String(), id); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// takePreKey hands out one of the device's uploaded pre-keys to a new
// contact, as the server does for a pre-key bundle; false when none is left.
func (s *Server) takePreKey(ctx context.Context, device types.JID) (uint32, bool, error) {
	var id uint32
	err := s.db.QueryRowContext(ctx, `DELETE FROM prekeys WHERE rowid = (SELECT rowid FROM prekeys WHERE device = ? ORDER BY key_id LIMIT 1) RETURNING key_id`, device.String()).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("sandbox: take pre-key: %w", err)
	}
	return id, true, nil
}

func (s *Server) serverPreKeys(ctx context.Context, device types.JID) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM prekeys WHERE device = ?`, device.String()).Scan(&n)
	return n, err
}
