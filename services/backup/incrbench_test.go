package backup_test

import (
	"context"
	"database/sql"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// BenchmarkCommitToDurable measures continuous replication's lag on
// PostgreSQL: a writer commits 50 times a second to a 10 MB store; the
// pipeline's own watcher (data_version, 50 ms) and the service's sync rule
// (a point at most every SYNC_INTERVAL after a change) ship deltas. A
// commit is durable once a point that started after it is committed; its
// lag is that point's commit time minus its own. Reports p50 and p99.
//
//	go test -run '^$' -bench CommitToDurable -benchtime 1x ./services/backup/
func BenchmarkCommitToDurable(b *testing.B) {
	for _, interval := range []time.Duration{time.Second, 250 * time.Millisecond} {
		b.Run("sync="+interval.String(), func(b *testing.B) {
			for range b.N {
				p50, p99, n := commitToDurable(b, interval, 10*time.Second)
				b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
				b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")
				b.ReportMetric(float64(n), "commits")
			}
		})
	}
}

func commitToDurable(b *testing.B, interval, run time.Duration) (p50, p99 time.Duration, commits int) {
	r := newIncrRigSized(b, "postgres", incr.Policy{}, 10<<20, clockwork.NewRealClock())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var commitAt []time.Time // commit i's time
	type shipped struct{ started, done time.Time }
	var points []shipped

	db, err := sql.Open("sqlite", wastore.DSN(r.path))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TABLE lag_probe (n INTEGER PRIMARY KEY, payload BLOB)`); err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	changed := make(chan struct{}, 1)
	wg.Go(func() {
		r.pipe.RunWatcher(ctx, 0, func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		})
	})
	// The service's sync rule (Service.syncLoop).
	wg.Go(func() {
		var last time.Time
		for {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			if wait := interval - time.Since(last); !last.IsZero() && wait > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
			}
			last = time.Now()
			o, err := r.pipe.Point(ctx, backup.Run{Job: backup.JobInfo{Reason: backup.ReasonSync}, Catalog: r.st})
			if err != nil || o.Where != bus.StoredDatabase {
				if ctx.Err() == nil {
					b.Errorf("point: %+v, %v", o, err)
				}
				return
			}
			mu.Lock()
			points = append(points, shipped{last, time.Now()})
			mu.Unlock()
		}
	})
	// The writer: 50 commits a second, each a session-sized row.
	tick := time.NewTicker(20 * time.Millisecond)
	rng := rand.New(rand.NewPCG(1, 2))
	payload := make([]byte, 900)
	end := time.Now().Add(run)
	for n := 0; time.Now().Before(end); n++ {
		<-tick.C
		for i := range payload {
			payload[i] = byte(rng.Uint32())
		}
		if _, err := db.Exec(`INSERT INTO lag_probe (n, payload) VALUES (?, ?)`, n, payload); err != nil {
			b.Fatal(err)
		}
		mu.Lock()
		commitAt = append(commitAt, time.Now())
		mu.Unlock()
	}
	tick.Stop()
	// The last commits ship: wait for a point that started after the last
	// commit, at most a few intervals.
	lastCommit := commitAt[len(commitAt)-1]
	deadline := time.Now().Add(10 * interval)
	for {
		mu.Lock()
		done := len(points) > 0 && !points[len(points)-1].started.Before(lastCommit)
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		<-time.After(interval / 10)
	}
	cancel()
	wg.Wait()
	var lags []time.Duration
	for _, at := range commitAt {
		for _, p := range points {
			if !p.started.Before(at) {
				lags = append(lags, p.done.Sub(at))
				break
			}
		}
	}
	if len(lags) < len(commitAt)*9/10 {
		b.Fatalf("only %d of %d commits shipped", len(lags), len(commitAt))
	}
	slices.Sort(lags)
	return lags[len(lags)/2], lags[len(lags)*99/100], len(commitAt)
}

// BenchmarkBusyDayStorage simulates a busy bot's day on a fake clock and
// reports what the database holds against the store's size, with
// compaction (the default policy: a base once the deltas carry half of
// one, or it is a day old) and retention (BACKUP_RETENTION's default, 48,
// every 10 simulated minutes) running.
//
// Shortened: one point a simulated second for an hour and a half of
// sustained peak traffic (5,400 points, each after 3 Signal session
// rewrites, a message secret inserted and old ones deleted), then the clock
// jumps to the day's end for one more point, compaction and retention. With
// retention by count, what is held is steady once the first compaction has
// happened, so the peak over the run bounds the day's.
//
//	go test -run '^$' -bench BusyDayStorage -benchtime 1x ./services/backup/
func BenchmarkBusyDayStorage(b *testing.B) {
	for range b.N {
		clock := clockwork.NewFakeClock()
		r := newIncrRigRetaining(b, "postgres", incr.Policy{}, 8<<20, clock, backup.Retention{Count: backup.DefaultRetention})
		db, err := sql.Open("sqlite", wastore.DSN(r.path))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS busy_secrets (id INTEGER PRIMARY KEY, secret BLOB)`); err != nil {
			b.Fatal(err)
		}
		var sessions int
		if err := db.QueryRow(`SELECT COUNT(*) FROM whatsmeow_sessions`).Scan(&sessions); err != nil || sessions == 0 {
			b.Fatalf("sessions: %d, %v", sessions, err)
		}
		rng := rand.New(rand.NewPCG(3, 4))
		blob := func(n int) []byte {
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			return p
		}
		ctx := context.Background()
		var peak, written int64
		var storeSize int64
		step := func(i int) {
			for range 3 {
				if _, err := db.Exec(`UPDATE whatsmeow_sessions SET session = ? WHERE rowid = (SELECT rowid FROM whatsmeow_sessions LIMIT 1 OFFSET ?)`,
					blob(1200), rng.IntN(sessions)); err != nil {
					b.Fatal(err)
				}
			}
			if _, err := db.Exec(`INSERT INTO busy_secrets (secret) VALUES (?)`, blob(200)); err != nil {
				b.Fatal(err)
			}
			if _, err := db.Exec(`DELETE FROM busy_secrets WHERE id < ?`, i-2000); err != nil {
				b.Fatal(err)
			}
			o, err := r.pipe.Point(ctx, backup.Run{Job: backup.JobInfo{Reason: backup.ReasonSync}, Catalog: r.st})
			if err != nil {
				b.Fatal(err)
			}
			written += o.Stored
			if i%600 == 599 {
				if _, _, err := r.pipe.Retain(ctx, r.st, backup.Retention{Count: backup.DefaultRetention}); err != nil {
					b.Fatal(err)
				}
			}
			st, err := r.st.PointStats(ctx, session)
			if err != nil {
				b.Fatal(err)
			}
			peak = max(peak, st.StoredBytes())
			clock.Advance(time.Second)
		}
		const points = 5400
		for i := range points {
			step(i)
		}
		clock.Advance(24*time.Hour - points*time.Second)
		step(points)
		if _, _, err := r.pipe.Retain(ctx, r.st, backup.Retention{Count: backup.DefaultRetention}); err != nil {
			b.Fatal(err)
		}
		final, _ := r.st.PointStats(ctx, session)
		if _, err := db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
			b.Fatal(err)
		}
		fi, err := os.Stat(r.path)
		if err != nil {
			b.Fatal(err)
		}
		storeSize = fi.Size()
		_ = db.Close()
		b.ReportMetric(float64(peak)/float64(storeSize), "peak-x-store")
		b.ReportMetric(float64(final.StoredBytes())/float64(storeSize), "end-x-store")
		b.ReportMetric(float64(written)/float64(storeSize), "written-x-store")
		b.ReportMetric(float64(final.Bases), "bases-held")
		b.ReportMetric(float64(storeSize)/(1<<20), "store-MB")
	}
}
