package snapshot

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/wastore"
)

// Run: go test -bench . -benchtime 3x -run '^$' ./services/backup/snapshot
//
// Each benchmark times our path and a plain file copy of the same store in the same loop, alternating, and reports
// both and their ratio, so machine noise hits both sides alike. ns/op is the sum of both sides; read the metrics.

var benchSizes = []int64{1 << 20, 10 << 20, 100 << 20}

// benchStores generates the stores once per benchmark function (the 100 MB one takes a few seconds).
func benchStores(b *testing.B) map[int64]string {
	b.Helper()
	dir := b.TempDir()
	out := make(map[int64]string)
	for _, size := range benchSizes {
		p := filepath.Join(dir, fmt.Sprintf("session-%dMB.db", size>>20))
		if err := wastore.Create(b.Context(), p, size); err != nil {
			b.Fatal(err)
		}
		out[size] = p
	}
	return out
}

func ms(d time.Duration, n int) float64 { return float64(d) / float64(time.Millisecond) / float64(n) }

// plainCopy is the baseline: read the file, write it elsewhere.
func plainCopy(b *testing.B, src, dst string) {
	b.Helper()
	raw, err := os.ReadFile(src)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(dst, raw, 0o600); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkSnapshot: ReadConsistent + Encode with a key, against os.ReadFile + os.WriteFile of the store.
func BenchmarkSnapshot(b *testing.B) {
	stores := benchStores(b)
	key := testKey(1)
	for _, size := range benchSizes {
		path := stores[size]
		b.Run(fmt.Sprintf("%dMB", size>>20), func(b *testing.B) {
			dst := filepath.Join(b.TempDir(), "copy.db")
			var read, encode, cp time.Duration
			var n int
			var stored, plain int64
			for b.Loop() {
				t0 := time.Now()
				data, err := ReadConsistent(b.Context(), path)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				payload, meta, err := Encode(data, key)
				if err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				plainCopy(b, path, dst)
				t3 := time.Now()
				read += t1.Sub(t0)
				encode += t2.Sub(t1)
				cp += t3.Sub(t2)
				stored, plain = int64(len(payload)), meta.Size
				n++
			}
			b.ReportMetric(ms(read+encode, n), "snapshot-ms")
			b.ReportMetric(ms(read, n), "read-ms")
			b.ReportMetric(ms(encode, n), "encode-ms")
			b.ReportMetric(ms(cp, n), "copy-ms")
			b.ReportMetric(float64(read+encode)/float64(cp), "ratio")
			b.ReportMetric(float64(stored)/float64(plain), "stored/plain")
		})
	}
}

// BenchmarkRestore: Decode + WriteFileAtomic (temp file, fsync, rename, dir fsync), against os.ReadFile +
// os.WriteFile of the store. Verify (integrity_check + device lookup on a temp copy), which restore runs before
// writing, is reported next to it, with quick_check for comparison.
func BenchmarkRestore(b *testing.B) {
	stores := benchStores(b)
	key := testKey(1)
	for _, size := range benchSizes {
		path := stores[size]
		data, err := ReadConsistent(b.Context(), path)
		if err != nil {
			b.Fatal(err)
		}
		payload, _, err := Encode(data, key)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("%dMB", size>>20), func(b *testing.B) {
			dir := b.TempDir()
			target := filepath.Join(dir, "session.db")
			dst := filepath.Join(dir, "copy.db")
			var decode, write, verify, quick, cp time.Duration
			var n int
			for b.Loop() {
				t0 := time.Now()
				plain, _, err := Decode(payload, key)
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := WriteFileAtomic(target, plain, 0o600); err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				plainCopy(b, path, dst)
				t3 := time.Now()
				if has, err := Verify(b.Context(), plain, dir); err != nil || !has {
					b.Fatalf("verify: %v %v", has, err)
				}
				t4 := time.Now()
				quickCheck(b, target)
				t5 := time.Now()
				decode += t1.Sub(t0)
				write += t2.Sub(t1)
				cp += t3.Sub(t2)
				verify += t4.Sub(t3)
				quick += t5.Sub(t4)
				n++
			}
			b.ReportMetric(ms(decode+write, n), "restore-ms")
			b.ReportMetric(ms(decode, n), "decode-ms")
			b.ReportMetric(ms(write, n), "write-ms")
			b.ReportMetric(ms(cp, n), "copy-ms")
			b.ReportMetric(float64(decode+write)/float64(cp), "ratio")
			b.ReportMetric(ms(verify, n), "verify-ms")
			b.ReportMetric(ms(quick, n), "quickcheck-ms")
		})
	}
}

func quickCheck(b *testing.B, path string) {
	b.Helper()
	db, err := sql.Open("sqlite", dsn(path, true))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var s string
	if err := db.QueryRowContext(b.Context(), "PRAGMA quick_check").Scan(&s); err != nil || s != "ok" {
		b.Fatalf("quick_check: %q %v", s, err)
	}
}
