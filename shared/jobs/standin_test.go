package jobs_test

import (
	"context"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertype"
)

type pgxTx = pgx.Tx

type sendLike struct {
	Key string `json:"key"`
}

func (sendLike) Kind() string { return jobs.KindRelaySend }

func postgresClient(t *testing.T) (*river.Client[pgxTx], *pgxpool.Pool) {
	t.Helper()
	ctx := context.Background()
	db := testdb.Postgres(t)
	pool, err := pgxpool.New(ctx, db.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	driver := riverpgxv5.New(pool)
	if err := jobs.Migrate(ctx, driver); err != nil {
		t.Fatal(err)
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, otherWorker{})
	client, err := jobs.NewClient(driver, jobs.Config{
		Queues:  map[string]river.QueueConfig{"blacksky_test_other": {MaxWorkers: 1}},
		Workers: workers,
	})
	if err != nil {
		t.Fatal(err)
	}
	return client, pool
}

// A job a killed process of another service was running is retried by the
// rescuer of whichever client leads, not discarded for want of a worker.
func TestStuckJobOfAnotherServiceIsRetriedNotDiscarded(t *testing.T) {
	ctx := context.Background()
	client, pool := postgresClient(t)
	res, err := client.Insert(ctx, sendLike{Key: "k"}, &river.InsertOpts{Queue: jobs.QueueRelaySend})
	if err != nil {
		t.Fatal(err)
	}
	// As a SIGKILLed relay leaves it: running, attempted long ago.
	if _, err := pool.Exec(ctx, `UPDATE river_job SET state = 'running', attempt = 1,
		attempted_at = now() - interval '4 minutes', attempted_by = ARRAY['dead-client'] WHERE id = $1`, res.Job.ID); err != nil {
		t.Fatal(err)
	}
	if err := client.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer stopClient(t, client)
	var state rivertype.JobState
	testwait.For(t, 60*time.Second, "the stuck job rescued", func() bool {
		job, err := client.JobGet(ctx, res.Job.ID)
		if err != nil {
			return false
		}
		state = job.State
		return state != rivertype.JobStateRunning
	})
	if state == rivertype.JobStateDiscarded {
		t.Fatalf("the stuck job was discarded; want it retried")
	}
}

// A job inserted due now is available at once, not after the leader's
// scheduler runs (up to 5 s later).
func TestJobDueNowIsAvailableAtOnce(t *testing.T) {
	ctx := context.Background()
	client, _ := postgresClient(t)
	res, err := client.Insert(ctx, sendLike{Key: "now"}, &river.InsertOpts{Queue: jobs.QueueRelaySend, ScheduledAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if res.Job.State != rivertype.JobStateAvailable {
		t.Fatalf("job due now inserted %s, want available", res.Job.State)
	}
	later, err := client.Insert(ctx, sendLike{Key: "later"}, &river.InsertOpts{Queue: jobs.QueueRelaySend, ScheduledAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if later.Job.State != rivertype.JobStateScheduled {
		t.Fatalf("job due in an hour inserted %s, want scheduled", later.Job.State)
	}
}

func stopClient(t *testing.T, client *river.Client[pgxTx]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := jobs.Stop(ctx, client); err != nil {
		t.Error(err)
	}
}
