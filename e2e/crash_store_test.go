package e2e

import (
	"context"
	"database/sql"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// What the crash test reads of a session store. The sandbox moves a
// contact's session row for every message it decrypts (the ratchet), in
// the row's own committed write, and puts the row's message count in its
// first four bytes (services/gateway/sandbox/traffic.go): the count is the
// contact's ratchet position, readable without the Signal protocol.

// ratchets is every contact's ratchet position in one store.
type ratchets map[string]uint32 // their_id -> messages the ratchet moved for

// readRatchets reads the sessions table in one read transaction.
func readRatchets(ctx context.Context, db *sql.DB) (ratchets, error) {
	rows, err := db.QueryContext(ctx, `SELECT their_id, session FROM whatsmeow_sessions`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := ratchets{}
	for rows.Next() {
		var id string
		var rec []byte
		if err := rows.Scan(&id, &rec); err != nil {
			return nil, err
		}
		if len(rec) < 4 {
			return nil, fmt.Errorf("session row of %s has %d bytes", id, len(rec))
		}
		out[id] = binary.BigEndian.Uint32(rec)
	}
	return out, rows.Err()
}

// bufferedEvents is whatsmeow's decrypted event buffer: one row per
// message decrypted, stamped by whatsmeow (time.Now in the writing
// process) just before the row's insert commits.
func bufferedEvents(ctx context.Context, db *sql.DB) (map[string]time.Time, error) {
	rows, err := db.QueryContext(ctx, `SELECT hex(ciphertext_hash), insert_timestamp FROM whatsmeow_event_buffer`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var h string
		var ms int64
		if err := rows.Scan(&h, &ms); err != nil {
			return nil, err
		}
		out[h] = time.UnixMilli(ms)
	}
	return out, rows.Err()
}

// openStore opens a session store read-only, as a second process beside
// the gateway would (WAL: readers never block its writes).
func openStore(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = db.Close() })
	return db
}

// copyStore copies a dead process's store (database, WAL, shared memory)
// so it can be opened and recovered without touching the original.
func copyStore(t *testing.T, path string) string {
	t.Helper()
	dir := t.TempDir()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		src, err := os.Open(path + suffix)
		if os.IsNotExist(err) {
			continue
		} else if err != nil {
			t.Fatal(err)
		}
		dst, err := os.Create(filepath.Join(dir, "session.db"+suffix))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(dst, src); err != nil {
			t.Fatal(err)
		}
		_ = src.Close()
		if err := dst.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "session.db")
}

// observation is the ratchets of a live store and a time by which every
// one of them was committed: taken after the read returned.
type observation struct {
	at time.Time
	r  ratchets
}

// observer polls a live store's ratchets. Its goroutine is started by
// observe and ended and waited for by stop.
type observer struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	seen   []observation
	errs   int
}

// observeEvery is the poll period: a write committed before a cutoff and
// first seen after it is left out of that round's check, so the check
// covers every write but those of the last period before the cutoff.
const observeEvery = 20 * time.Millisecond

func observe(t *testing.T, path string) *observer {
	t.Helper()
	db := openStore(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	o := &observer{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(o.done)
		tick := time.NewTicker(observeEvery)
		defer tick.Stop()
		for {
			r, err := readRatchets(ctx, db)
			at := time.Now()
			o.mu.Lock()
			if err != nil {
				o.errs++
			} else {
				o.seen = append(o.seen, observation{at: at, r: r})
			}
			o.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(o.stop)
	return o
}

func (o *observer) stop() {
	o.cancel()
	<-o.done
}

// first is the first observation; asOf the newest taken by cutoff.
func (o *observer) first() (observation, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.seen) == 0 {
		return observation{}, false
	}
	return o.seen[0], true
}

func (o *observer) asOf(cutoff time.Time) (observation, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for i := len(o.seen) - 1; i >= 0; i-- {
		if !o.seen[i].at.After(cutoff) {
			return o.seen[i], true
		}
	}
	return observation{}, false
}
