package jobs_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riversqlite"
	"go.uber.org/goleak"
	_ "modernc.org/sqlite"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type otherArgs struct{}

func (otherArgs) Kind() string { return "blacksky_test_other" }

type otherWorker struct {
	river.WorkerDefaults[otherArgs]
}

func (otherWorker) Work(context.Context, *river.Job[otherArgs]) error { return nil }

// A client that does not work the backup queue still enqueues the scheduled
// snapshot when it leads: every client carries the whole Schedule.
func TestEveryClientEnqueuesTheWholeSchedule(t *testing.T) {
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
		Schedule:     jobs.Schedule{BackupInterval: time.Second},
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
	var got *river.JobListResult
	testwait.For(t, 20*time.Second, "a scheduled snapshot job", func() bool {
		got, err = client.JobList(ctx, river.NewJobListParams().Kinds(jobs.KindSnapshot))
		return err == nil && len(got.Jobs) > 0
	})
	job := got.Jobs[0]
	var args struct {
		Reason string `json:"reason"`
	}
	if err := json.Unmarshal(job.EncodedArgs, &args); err != nil || args.Reason != "scheduled" || job.Queue != jobs.QueueBackup {
		t.Fatalf("scheduled job = queue %q args %s (%v)", job.Queue, job.EncodedArgs, err)
	}
}

// River's log reaches ours at warning level and above only.
func TestRiverLogsWarningsOnly(t *testing.T) {
	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	q := slog.New(jobs.QuietHandlerForTest(log.Handler()))
	q.Info("producer: Producer job counts")
	q.Debug("noise")
	q.Warn("something to act on")
	if strings.Contains(buf.String(), "job counts") || strings.Contains(buf.String(), "noise") || !strings.Contains(buf.String(), "something to act on") {
		t.Fatalf("log = %q", buf.String())
	}
}
