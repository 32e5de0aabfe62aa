package sandbox_test

import (
	"database/sql"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
)

// flood injects per messages from each of contacts contacts and waits until
// all of them are on P.msg.in.
func flood(b *testing.B, r *rig, seen *atomic.Int64, contacts, per int, round int) {
	b.Helper()
	want := seen.Load() + int64(contacts*per)
	for c := range contacts {
		r.inject(sandbox.Inject{From: fmt.Sprintf("4915%07d", c), Content: sandbox.Content{Text: fmt.Sprintf("round %d", round)}, Count: per})
	}
	testwait.For(b, 5*time.Minute, "the flood on msg.in", func() bool { return seen.Load() >= want })
}

func countMsgIn(b *testing.B, r *rig) *atomic.Int64 {
	b.Helper()
	var n atomic.Int64
	sub, err := r.nc.Subscribe(r.subj.MsgIn(), func(*nats.Msg) { n.Add(1) })
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := r.nc.Flush(); err != nil {
		b.Fatal(err)
	}
	return &n
}

// BenchmarkFloodToMsgIn: 1,000 messages from 100 contacts per iteration,
// injected at once, through the real gateway to P.msg.in (each one moving
// the store and acknowledged in the server file).
func BenchmarkFloodToMsgIn(b *testing.B) {
	r := newRig(b, b.TempDir())
	r.linked()
	seen := countMsgIn(b, r)
	flood(b, r, seen, 100, 1, -1) // the contacts' first messages (pre-key messages) out of the way
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		flood(b, r, seen, 100, 10, i)
	}
	b.ReportMetric(float64(b.N*1000)/time.Since(start).Seconds(), "msgs/s")
	b.ReportMetric(0, "ns/op")
}

// storeBytes is the session store's size including the WAL's pages.
func storeBytes(b *testing.B, path string) int64 {
	b.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var pages, size int64
	if err := db.QueryRow(`PRAGMA page_count`).Scan(&pages); err != nil {
		b.Fatal(err)
	}
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&size); err != nil {
		b.Fatal(err)
	}
	return pages * size
}

func sessionBytes(b *testing.B, path string) int64 {
	b.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var n int64
	if err := db.QueryRow(`SELECT coalesce(sum(length(session)), 0) FROM whatsmeow_sessions`).Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

// BenchmarkStoreGrowthPer1000 measures how the session store grows: the
// first 1,000 messages from 100 new contacts, then each further 1,000 from
// the same contacts (ratchet churn only).
func BenchmarkStoreGrowthPer1000(b *testing.B) {
	for i := range b.N {
		dir := b.TempDir()
		r := newRig(b, dir)
		r.linked()
		seen := countMsgIn(b, r)
		path := filepath.Join(dir, "session.db")
		s0, k0 := storeBytes(b, path), sessionBytes(b, path)
		flood(b, r, seen, 100, 10, 0)
		s1, k1 := storeBytes(b, path), sessionBytes(b, path)
		for round := 1; round <= 4; round++ {
			flood(b, r, seen, 100, 10, round)
		}
		s2, k2 := storeBytes(b, path), sessionBytes(b, path)
		if i == b.N-1 {
			b.ReportMetric(float64(s1-s0), "store-B/first-1k")
			b.ReportMetric(float64(s2-s1)/4, "store-B/next-1k")
			b.ReportMetric(float64(k1-k0), "session-row-B/first-1k")
			b.ReportMetric(float64(k2-k1)/4, "session-row-B/next-1k")
		}
		r.stop()
	}
}
