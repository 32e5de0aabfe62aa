package incr

import (
	"database/sql"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// Run: go test -bench . -benchtime 3x -count 5 -run '^$' ./services/backup/incr
//
// Both benchmarks build a 100 MB whatsmeow-shaped store (internal/wastore: the real schema, Signal rows of random
// key bytes) and time our path and today's full snapshot side by side in the same loop. ns/op is the sum; read the
// metrics.

const benchSize = 100 << 20

func ms(d time.Duration, n int) float64 { return float64(d) / float64(time.Millisecond) / float64(n) }

// rewriteSessions rewrites n random Signal session rows, batch rows per transaction, as decrypting messages does.
func rewriteSessions(b *testing.B, db *sql.DB, rng *rand.Rand, rows, n, batch int) {
	b.Helper()
	for done := 0; done < n; {
		tx, err := db.BeginTx(b.Context(), nil)
		if err != nil {
			b.Fatal(err)
		}
		for i := 0; i < batch && done < n; i++ {
			blob := make([]byte, 600+rng.IntN(200))
			for j := range blob {
				blob[j] = byte(rng.Uint32())
			}
			if _, err := tx.ExecContext(b.Context(), `UPDATE whatsmeow_sessions SET session = ? WHERE rowid = (SELECT rowid FROM whatsmeow_sessions LIMIT 1 OFFSET ?)`,
				blob, rng.IntN(rows)); err != nil {
				b.Fatal(err)
			}
			done++
		}
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
	}
}

func benchStore(b *testing.B) (string, *sql.DB, int) {
	b.Helper()
	path := filepath.Join(b.TempDir(), "session.db")
	if err := wastoreCreate(b, path); err != nil {
		b.Fatal(err)
	}
	db := openDB(b, path)
	var rows int
	if err := db.QueryRowContext(b.Context(), "SELECT count(*) FROM whatsmeow_sessions").Scan(&rows); err != nil {
		b.Fatal(err)
	}
	return path, db, rows
}

// BenchmarkDelta1Percent: a 100 MB store with about 1% of its pages changed (1.4% of its session rows rewritten,
// ten per transaction). Full snapshot = snapshot.ReadConsistent + snapshot.Encode with a key, as the backup service
// does today; delta = Capturer.Delta. Reported: both times, their ratio, both stored sizes, the pages changed.
func BenchmarkDelta1Percent(b *testing.B) {
	path, db, rows := benchStore(b)
	key := testKey(1)
	ps := NewMemStore()
	c := capturer(b, path, key, ps)
	base, err := c.Base(b.Context(), 1, 1)
	if err != nil {
		b.Fatal(err)
	}
	keep(b, ps, base)
	last := base.Manifest
	rng := rand.New(rand.NewPCG(1, 2))
	var full, delta time.Duration
	var fullBytes, deltaBytes, pages int64
	n := 0
	for b.Loop() {
		rewriteSessions(b, db, rng, rows, rows/70, 10)
		t0 := time.Now()
		raw, err := snapshot.ReadConsistent(b.Context(), path)
		if err != nil {
			b.Fatal(err)
		}
		payload, _, err := snapshot.Encode(raw, key)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		pt, err := c.Delta(b.Context(), last, 1)
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		keep(b, ps, pt)
		last = pt.Manifest
		full += t1.Sub(t0)
		delta += t2.Sub(t1)
		fullBytes += int64(len(payload))
		deltaBytes += pt.StoredBytes()
		pages += int64(len(pt.Manifest.Pages))
		n++
		if pt.FullRead {
			b.Fatal("delta read every page")
		}
	}
	b.ReportMetric(ms(full, n), "snapshot-ms")
	b.ReportMetric(ms(delta, n), "delta-ms")
	b.ReportMetric(float64(delta)/float64(full), "delta/snapshot")
	b.ReportMetric(float64(fullBytes)/float64(n)/1e6, "snapshot-MB")
	b.ReportMetric(float64(deltaBytes)/float64(n)/1e6, "delta-MB")
	b.ReportMetric(100*float64(pages)/float64(n)/float64(last.PageCount), "changed-%")
}

// BenchmarkRestoreChain: a base of a 100 MB store and 1,000 deltas of ten rewritten session rows each (a busy
// bot's second; together about 40% of the base's pages, under the default compaction share), against one full
// snapshot of the same final store. Both sides include writing the file, fsync, rename and integrity_check.
func BenchmarkRestoreChain(b *testing.B) {
	path, db, rows := benchStore(b)
	key := testKey(1)
	ps := NewMemStore()
	c := capturer(b, path, key, ps)
	base, err := c.Base(b.Context(), 1, 1)
	if err != nil {
		b.Fatal(err)
	}
	sealed := [][]byte{keep(b, ps, base)}
	last := base.Manifest
	rng := rand.New(rand.NewPCG(3, 4))
	var chainBytes, deltaPages int64
	for range 1000 {
		rewriteSessions(b, db, rng, rows, 10, 10)
		pt, err := c.Delta(b.Context(), last, 1)
		if err != nil {
			b.Fatal(err)
		}
		sealed = append(sealed, keep(b, ps, pt))
		chainBytes += pt.StoredBytes()
		deltaPages += int64(len(pt.Manifest.Pages))
		last = pt.Manifest
	}
	raw, err := snapshot.ReadConsistent(b.Context(), path)
	if err != nil {
		b.Fatal(err)
	}
	payload, _, err := snapshot.Encode(raw, key)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	var chain, full time.Duration
	n := 0
	for b.Loop() {
		t0 := time.Now()
		res, err := Restore(b.Context(), filepath.Join(dir, "chain.db"), sealed, RestoreOptions{Key: key, Pieces: ps})
		if err != nil || res.Point.ID != last.ID {
			b.Fatalf("restore: %v", err)
		}
		t1 := time.Now()
		plain, _, err := snapshot.Decode(payload, key)
		if err != nil {
			b.Fatal(err)
		}
		target := filepath.Join(dir, "full.db")
		if err := snapshot.WriteFileAtomic(target, plain, 0o600); err != nil {
			b.Fatal(err)
		}
		if err := snapshot.Check(b.Context(), target); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		chain += t1.Sub(t0)
		full += t2.Sub(t1)
		n++
	}
	b.ReportMetric(ms(chain, n), "chain-restore-ms")
	b.ReportMetric(ms(full, n), "snapshot-restore-ms")
	b.ReportMetric(float64(chain)/float64(full), "chain/snapshot")
	b.ReportMetric(float64(chainBytes)/1e6, "deltas-MB")
	b.ReportMetric(float64(len(payload))/1e6, "snapshot-MB")
	b.ReportMetric(100*float64(deltaPages)/float64(last.PageCount), "delta-pages-%")
}
