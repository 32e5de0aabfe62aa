// Package wastore builds realistic whatsmeow session stores (SQLite) for tests and benchmarks: whatsmeow's real
// sqlstore schema, a linked device, and Signal-like rows of random key bytes up to a target size, plus a Writer that
// keeps committing numbered rows, as the gateway does while a snapshot is taken.
package wastore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"sync"

	"go.mau.fi/whatsmeow/proto/waAdv"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/store/sqlstore"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/util/keys"
	_ "modernc.org/sqlite" // registers the pure-Go "sqlite" driver
)

// DeviceJID is the JID of the linked device that Create stores.
var DeviceJID = types.JID{User: "15551234567", Server: types.DefaultUserServer, Device: 12}

// Options tune Create. The zero value is a linked store of the minimum size with seed 0.
type Options struct {
	// Size is the target file size in bytes. The store is filled until it reaches it (within one batch, about 1%).
	Size int64
	// Unpaired leaves whatsmeow_device empty: the schema of a store that never finished pairing.
	Unpaired bool
	// Seed makes the random content reproducible.
	Seed uint64
}

// DSN is the modernc URI the gateway uses for a whatsmeow store: foreign keys (whatsmeow refuses to run without
// them), WAL, and a busy timeout.
func DSN(path string) string {
	q := url.Values{}
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "busy_timeout(10000)")
	return "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
}

// Create makes a linked whatsmeow store of about size bytes at path (which must not exist).
func Create(ctx context.Context, path string, size int64) error {
	return CreateWith(ctx, path, Options{Size: size})
}

// CreateUnpaired makes a store with whatsmeow's schema and no device: what a never-paired gateway leaves behind.
func CreateUnpaired(ctx context.Context, path string) error {
	return CreateWith(ctx, path, Options{Unpaired: true})
}

// CreateWith makes a store at path as opts say. The schema comes from whatsmeow's own upgrade, the device and a
// first set of keys go through whatsmeow's store API, and the bulk is inserted by SQL in large transactions, into
// the same tables, with the row shapes and sizes whatsmeow writes.
func CreateWith(ctx context.Context, path string, opts Options) error {
	if _, err := os.Stat(path); err == nil {
		return fmt.Errorf("create store: %s already exists", path)
	}
	container, err := sqlstore.New(ctx, "sqlite", DSN(path), nil)
	if err != nil {
		return fmt.Errorf("create store: %w", err)
	}
	rng := rand.New(rand.NewChaCha8(seed(opts.Seed)))
	if !opts.Unpaired {
		if err := addDevice(ctx, container, rng); err != nil {
			_ = container.Close()
			return fmt.Errorf("create store: %w", err)
		}
	}
	if err := container.Close(); err != nil {
		return fmt.Errorf("create store: close whatsmeow container: %w", err)
	}
	if opts.Unpaired {
		return nil
	}
	if err := fill(ctx, path, opts.Size, rng); err != nil {
		return fmt.Errorf("create store: %w", err)
	}
	return nil
}

func seed(s uint64) [32]byte {
	var b [32]byte
	for i := range 4 {
		for j := range 8 {
			b[i*8+j] = byte(s >> (8 * j))
		}
		s = s*6364136223846793005 + 1442695040888963407
	}
	return b
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// addDevice saves a linked device the way pairing does (Device.Save) and gives it the keys a fresh link holds.
func addDevice(ctx context.Context, c *sqlstore.Container, rng *rand.Rand) error {
	// libsignal sets its package logger lazily, unsynchronised, on the first signature: two stores created in
	// parallel tests race on it (seen with -race). One signature under a Once makes that first write happen-before
	// every later read.
	libsignalInit.Do(func() { keys.NewKeyPair().CreateSignedPreKey(0) })
	dev := c.NewDevice()
	jid := DeviceJID
	dev.ID = &jid
	dev.Platform = "android"
	dev.PushName = "BLACKSKY-MD"
	dev.Account = &waAdv.ADVSignedDeviceIdentity{
		Details:             randBytes(rng, 90),
		AccountSignatureKey: randBytes(rng, 32),
		AccountSignature:    randBytes(rng, 64),
		DeviceSignature:     randBytes(rng, 64),
	}
	if err := dev.Save(ctx); err != nil {
		return fmt.Errorf("save device: %w", err)
	}
	// whatsmeow uploads pre-keys in batches of this size after pairing.
	if _, err := dev.PreKeys.GetOrGenPreKeys(ctx, 50); err != nil {
		return fmt.Errorf("generate pre-keys: %w", err)
	}
	for _, name := range appStateNames {
		var hash [128]byte
		copy(hash[:], randBytes(rng, 128))
		if err := dev.AppState.PutAppStateVersion(ctx, name, 1, hash); err != nil {
			return fmt.Errorf("app state version: %w", err)
		}
	}
	for i := range 3 {
		key := store.AppStateSyncKey{Data: randBytes(rng, 32), Fingerprint: randBytes(rng, 20), Timestamp: int64(1_700_000_000 + i)}
		if err := dev.AppStateKeys.PutAppStateSyncKey(ctx, randBytes(rng, 6), key); err != nil {
			return fmt.Errorf("app state sync key: %w", err)
		}
	}
	return nil
}

var libsignalInit sync.Once

var appStateNames = []string{"critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low"}

// openRW opens the store with one connection: SQLite has one writer anyway, and one connection keeps the
// transactions of a fill or a Writer strictly ordered.
func openRW(path string) (*sql.DB, error) {
	db, err := sql.Open("sqlite", DSN(path))
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// fill inserts Signal-like rows until the database reaches size bytes, then checkpoints the WAL into the file so
// the file itself has that size.
func fill(ctx context.Context, path string, size int64, rng *rand.Rand) (err error) {
	db, err := openRW(path)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, db.Close()) }()
	// The generator's own durability does not matter: a crash just means a rerun. Ask for speed.
	if _, err := db.ExecContext(ctx, "PRAGMA synchronous = OFF"); err != nil {
		return fmt.Errorf("pragma: %w", err)
	}
	f := &filler{db: db, rng: rng, our: DeviceJID.String()}
	for {
		cur, err := dbSize(ctx, db)
		if err != nil {
			return err
		}
		left := size - cur
		if left <= 0 {
			break
		}
		// Aim at half of what is left per transaction (at most 8 MB), so the last batch overshoots by little.
		rounds := int(min(left/2, 8<<20)/roundBytes) + 1
		if err := f.batch(ctx, rounds); err != nil {
			return err
		}
	}
	if _, err := db.ExecContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

func dbSize(ctx context.Context, db *sql.DB) (int64, error) {
	var pages, pageSize int64
	if err := db.QueryRowContext(ctx, "PRAGMA page_count").Scan(&pages); err != nil {
		return 0, fmt.Errorf("page count: %w", err)
	}
	if err := db.QueryRowContext(ctx, "PRAGMA page_size").Scan(&pageSize); err != nil {
		return 0, fmt.Errorf("page size: %w", err)
	}
	return pages * pageSize, nil
}

// roundBytes is roughly what one filler round adds to the file (measured: rows plus b-tree and index overhead).
const roundBytes = 40 << 10

// filler writes the rows of a busy account: Signal sessions (the bulk: a few KB each with their ratchet states),
// identity keys, pre-keys, group sender keys, message secrets, app state mutation MACs, contacts, LID mappings and
// privacy tokens.
type filler struct {
	db  *sql.DB
	rng *rand.Rand
	our string
	n   int // rounds done: keeps every primary key unique
}

var fillStmts = []string{
	`INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (?, ?, ?)`,
	`INSERT INTO whatsmeow_identity_keys (our_jid, their_id, identity) VALUES (?, ?, ?)`,
	`INSERT INTO whatsmeow_pre_keys (jid, key_id, key, uploaded) VALUES (?, ?, ?, ?)`,
	`INSERT INTO whatsmeow_sender_keys (our_jid, chat_id, sender_id, sender_key) VALUES (?, ?, ?, ?)`,
	`INSERT INTO whatsmeow_message_secrets (our_jid, chat_jid, sender_jid, message_id, key) VALUES (?, ?, ?, ?, ?)`,
	`INSERT INTO whatsmeow_app_state_mutation_macs (jid, name, version, index_mac, value_mac) VALUES (?, ?, ?, ?, ?)`,
	`INSERT INTO whatsmeow_contacts (our_jid, their_jid, first_name, full_name, push_name) VALUES (?, ?, ?, ?, ?)`,
	`INSERT INTO whatsmeow_lid_map (lid, pn) VALUES (?, ?)`,
	`INSERT INTO whatsmeow_privacy_tokens (our_jid, their_jid, token, timestamp) VALUES (?, ?, ?, ?)`,
}

const (
	stSession = iota
	stIdentity
	stPreKey
	stSenderKey
	stSecret
	stMAC
	stContact
	stLID
	stPrivacy
)

func (f *filler) batch(ctx context.Context, rounds int) (err error) {
	tx, err := f.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	stmts := make([]*sql.Stmt, len(fillStmts))
	for i, q := range fillStmts {
		if stmts[i], err = tx.PrepareContext(ctx, q); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
	}
	for range rounds {
		if err := f.round(ctx, stmts); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

func (f *filler) round(ctx context.Context, st []*sql.Stmt) error {
	r := f.rng
	f.n++
	exec := func(i int, args ...any) error {
		if _, err := st[i].ExecContext(ctx, args...); err != nil {
			return fmt.Errorf("insert (%s): %w", fillStmts[i][:40], err)
		}
		return nil
	}
	for i := range 10 {
		contact := fmt.Sprintf("1555%07d", f.n*10+i)
		addr := fmt.Sprintf("%s:%d", contact, r.IntN(3))
		if err := exec(stSession, f.our, addr, randBytes(r, 1000+r.IntN(4000))); err != nil {
			return err
		}
		if err := exec(stIdentity, f.our, addr, randBytes(r, 32)); err != nil {
			return err
		}
		if err := exec(stContact, f.our, contact+"@s.whatsapp.net", "Contact", fmt.Sprintf("Contact %d", f.n*10+i), fmt.Sprintf("~user%d", r.IntN(1e6))); err != nil {
			return err
		}
		if err := exec(stLID, fmt.Sprintf("%015d", 100_000_000_000_000+f.n*10+i), contact); err != nil {
			return err
		}
		if i%3 == 0 {
			if err := exec(stPrivacy, f.our, contact+"@s.whatsapp.net", randBytes(r, 24), 1_700_000_000+f.n); err != nil {
				return err
			}
		}
	}
	for i := range 10 {
		if err := exec(stPreKey, f.our, 1000+f.n*10+i, randBytes(r, 32), true); err != nil {
			return err
		}
	}
	for i := range 5 {
		group := fmt.Sprintf("120363%012d@g.us", f.n)
		sender := fmt.Sprintf("1555%07d:%d", r.IntN(1e7), i)
		if err := exec(stSenderKey, f.our, group, sender, randBytes(r, 150+r.IntN(1200))); err != nil {
			return err
		}
	}
	for i := range 40 {
		chat := fmt.Sprintf("1555%07d@s.whatsapp.net", r.IntN(1e7))
		id := fmt.Sprintf("3EB0%016X", uint64(f.n)<<8|uint64(i))
		if err := exec(stSecret, f.our, chat, chat, id, randBytes(r, 32)); err != nil {
			return err
		}
	}
	for i := range 20 {
		name := appStateNames[i%len(appStateNames)]
		if err := exec(stMAC, f.our, name, 1+f.n, randBytes(r, 32), randBytes(r, 32)); err != nil {
			return err
		}
	}
	return nil
}
