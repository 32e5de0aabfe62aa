package incr

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

func testKey(b byte) []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = b + byte(i)
	}
	return k
}

// newStore makes a small realistic whatsmeow store.
func newStore(t testing.TB, size int64) string {
	t.Helper()
	return newStoreSeed(t, size, 0)
}

func newStoreSeed(t testing.TB, size int64, seed uint64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "session.db")
	if err := wastore.CreateWith(t.Context(), p, wastore.Options{Size: size, Seed: seed}); err != nil {
		t.Fatal(err)
	}
	return p
}

// openDB opens a writer connection like the gateway's; pragmas are added (e.g. "wal_autocheckpoint(0)").
func openDB(t testing.TB, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", wastore.DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func mustExec(t testing.TB, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.ExecContext(context.Background(), q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// churn rewrites n session rows, one transaction each.
func churn(t testing.TB, db *sql.DB, n int, seed byte) {
	t.Helper()
	for i := range n {
		blob := make([]byte, 900)
		for j := range blob {
			blob[j] = byte(i*7+j) ^ seed
		}
		mustExec(t, db, `UPDATE whatsmeow_sessions SET session = ? WHERE rowid = (SELECT rowid FROM whatsmeow_sessions LIMIT 1 OFFSET ?)`,
			blob, (i*37+int(seed))%50)
	}
}

// fileDBHash is the DBHash of a database file read page by page (it must have no WAL).
func fileDBHash(t testing.TB, path string, pageSize int) Hash {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw)%pageSize != 0 {
		t.Fatalf("%s is %d bytes, not whole %d-byte pages", path, len(raw), pageSize)
	}
	hs := make([]Hash, len(raw)/pageSize)
	for i := range hs {
		hs[i] = sha256.Sum256(raw[i*pageSize : (i+1)*pageSize])
	}
	return DBHash(pageSize, hs)
}

// capturer opens a Capturer on path with a MemStore, closed at cleanup.
func capturer(t testing.TB, path string, key []byte, ps *MemStore) *Capturer {
	t.Helper()
	c, err := Open(t.Context(), path, Options{Key: key, Pieces: ps})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// keep stores a point's pieces and returns its sealed manifest.
func keep(t testing.TB, ps *MemStore, pt *Point) []byte {
	t.Helper()
	if err := pt.Store(t.Context(), ps); err != nil {
		t.Fatal(err)
	}
	return pt.Sealed
}

func restoreTo(t testing.TB, sealed [][]byte, ps PieceStore, key []byte) (string, Restored, error) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "restored.db")
	res, err := Restore(t.Context(), dst, sealed, RestoreOptions{Key: key, Pieces: ps})
	return dst, res, err
}

func mustDelta(t testing.TB, c *Capturer, since Manifest) *Point {
	t.Helper()
	pt, err := c.Delta(t.Context(), since, since.Generation)
	if err != nil {
		t.Fatal(err)
	}
	return pt
}

// liveDBHash is the DBHash of the store's current committed state, read page by page in one transaction on a
// connection of its own.
func liveDBHash(t testing.TB, path string) Hash {
	t.Helper()
	db := openDB(t, path)
	defer db.Close()
	rows, err := db.QueryContext(t.Context(), "SELECT data FROM sqlite_dbpage")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var hs []Hash
	for rows.Next() {
		var data []byte
		if err := rows.Scan(&data); err != nil {
			t.Fatal(err)
		}
		hs = append(hs, sha256.Sum256(data))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return DBHash(4096, hs)
}

var _ = errors.Is

func sha(b []byte) Hash { return sha256.Sum256(b) }

func snapshotEncode(plain, key []byte) ([]byte, snapshot.Meta, error) {
	return snapshot.Encode(plain, key)
}

func wastoreCreate(tb testing.TB, path string) error {
	return wastore.Create(tb.Context(), path, benchSize)
}
