package backup_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// BenchmarkRequestToCommitted measures P.backup.request -> reply (the
// snapshot committed in PostgreSQL) while a writer keeps changing the store,
// so every request yields a new snapshot. Reports p50 and p99 in ms.
//
//	go test -run '^$' -bench RequestToCommitted -benchtime 30x ./services/backup/
func BenchmarkRequestToCommitted(b *testing.B) {
	for _, size := range []int64{1 << 20, 10 << 20, 100 << 20} {
		b.Run(fmt.Sprintf("%dMB", size>>20), func(b *testing.B) {
			db := newDatabase(b, "postgres")
			dir := b.TempDir()
			path := newStore(b, dir, size)
			in := start(b, db, instOpts{dataDir: dir, env: map[string]string{"SESSION_ENCRYPTION_KEY": randHex(32), "LOG_LEVEL": "warn"}})
			w, err := wastore.StartWriter(context.Background(), path)
			if err != nil {
				b.Fatal(err)
			}
			defer w.Stop()
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				before := w.Last()
				testwait.For(b, 5*time.Second, "a write", func() bool { return w.Last() > before })
				t0 := time.Now()
				var rep bus.BackupReply
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				err := bus.Request(ctx, in.nc, in.subj.BackupRequest(), bus.BackupRequest{}, &rep)
				cancel()
				lat = append(lat, time.Since(t0))
				if err != nil || !rep.OK {
					b.Fatalf("reply %+v, %v", rep, err)
				}
			}
			b.StopTimer()
			slices.Sort(lat)
			pct := func(p float64) float64 {
				return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
			}
			b.ReportMetric(pct(0.50), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
		})
	}
}
