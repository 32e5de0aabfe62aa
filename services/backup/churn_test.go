package backup_test

import (
	"context"
	"database/sql"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/incr"
)

// churnRun is a sandbox-shaped run: every simulated second, rewrites
// scattered Signal session rows across the whole store (the sandbox injects
// 25 messages a second, each rewriting a session) and takes a point, with
// the pipeline retaining by keep and no periodic retention job at all (a
// process restarted more often than the job's interval never runs it). It
// returns the peak and final stored bytes, the store's size and the new
// bases taken.
type churnResult struct {
	peak, final, store int64
	bases              int64
}

func churnRun(t testing.TB, kind string, size int64, seconds, rewrites int, keep backup.Retention) churnResult {
	t.Helper()
	clock := clockwork.NewFakeClock()
	r := newIncrRigRetaining(t, kind, incr.Policy{}, size, clock, keep)
	db, err := sql.Open("sqlite", wastore.DSN(r.path))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var rows int
	if err := db.QueryRow(`SELECT COUNT(*) FROM whatsmeow_sessions`).Scan(&rows); err != nil || rows == 0 {
		t.Fatalf("sessions: %d, %v", rows, err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	blob := make([]byte, 1200)
	ctx := context.Background()
	var res churnResult
	for range seconds {
		tx, err := db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		for range rewrites {
			for i := range blob {
				blob[i] = byte(rng.Uint32())
			}
			if _, err := tx.Exec(`UPDATE whatsmeow_sessions SET session = ? WHERE rowid = (SELECT rowid FROM whatsmeow_sessions LIMIT 1 OFFSET ?)`,
				blob, rng.IntN(rows)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		before := len(points(t, r.st))
		r.point(0, backup.ReasonSync)
		if list := points(t, r.st); list[0].Kind == backup.PointBase && before > 0 {
			res.bases++
		}
		st, err := r.st.PointStats(ctx, session)
		if err != nil {
			t.Fatal(err)
		}
		res.peak = max(res.peak, st.StoredBytes())
		res.final = st.StoredBytes()
		clock.Advance(time.Second)
	}
	var pages, pageSize int64
	if err := db.QueryRow(`PRAGMA page_count`).Scan(&pages); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&pageSize); err != nil {
		t.Fatal(err)
	}
	res.store = pages * pageSize
	noUnreferencedPieces(t, r.st)
	restoreNewest(t, r.st, nil) // whole chains: the newest still restores
	return res
}

// Under sandbox-shaped churn (scattered session rewrites every second, so
// the 50% rule takes a new base every few points) the points stored stay
// within three times the store's size with the default retention, with only
// the pipeline's own retention running (no periodic job): the 48 points
// would be about ten bases, so the storage bound deletes the oldest chains.
func TestStorageStaysBoundedUnderScatteredChurn(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			res := churnRun(t, kind, 1<<20, 240, 25, backup.Retention{Count: backup.DefaultRetention})
			ratio := float64(res.peak) / float64(res.store)
			t.Logf("store %d bytes, %d new bases in 240 points; peak stored %d (%.2fx), final %d (%.2fx)",
				res.store, res.bases, res.peak, ratio, res.final, float64(res.final)/float64(res.store))
			if res.bases < 20 {
				t.Fatalf("%d new bases: the churn is not sandbox-shaped (want a base every few points)", res.bases)
			}
			if ratio > 3 {
				t.Fatalf("stored %.2fx the store at peak; want at most 3x", ratio)
			}
		})
	}
}

// BenchmarkChurnStorage is TestStorageStaysBoundedUnderScatteredChurn's
// run made long: half an hour of simulated seconds on a 4 MB store, 25
// scattered session rewrites a second, default retention, no periodic job.
//
//	go test -run '^$' -bench ChurnStorage -benchtime 1x ./services/backup/
func BenchmarkChurnStorage(b *testing.B) {
	for range b.N {
		res := churnRun(b, "postgres", 4<<20, 1800, 25, backup.Retention{Count: backup.DefaultRetention})
		b.ReportMetric(float64(res.peak)/float64(res.store), "peak-x-store")
		b.ReportMetric(float64(res.final)/float64(res.store), "end-x-store")
		b.ReportMetric(float64(res.bases), "new-bases")
		b.ReportMetric(float64(res.store)/(1<<20), "store-MB")
	}
}
