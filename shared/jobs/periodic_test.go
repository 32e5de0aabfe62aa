package jobs_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riversqlite"
)

// Compaction and retention are enqueued as soon as a client leads, not one
// interval later: a process restarted more often than the interval (10
// minutes) would otherwise never prune.
func TestMaintenanceJobsRunOnStart(t *testing.T) {
	ctx := context.Background()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "q.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	driver := riversqlite.New(db)
	if err := jobs.Migrate(ctx, driver); err != nil {
		t.Fatal(err)
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, otherWorker{})
	client, err := jobs.NewClient(driver, jobs.Config{
		Queues:       map[string]river.QueueConfig{"blacksky_test_other": {MaxWorkers: 1}},
		Workers:      workers,
		Schedule:     jobs.Schedule{Compaction: time.Hour, Retention: time.Hour},
		PollInterval: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := jobs.Stop(sctx, client); err != nil {
			t.Error(err)
		}
	}()
	for _, kind := range []string{jobs.KindCompaction, jobs.KindRetention} {
		testwait.For(t, 20*time.Second, kind+" job at start", func() bool {
			got, err := client.JobList(ctx, river.NewJobListParams().Kinds(kind))
			return err == nil && len(got.Jobs) > 0
		})
	}
}
