package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/blacksky-md/blacksky/shared/jobs"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/rivertype"
)

// Queue is the River client as the service sees it.
type Queue interface {
	Start(ctx context.Context) error
	// Stop waits for the running job (if any) to finish, until ctx ends.
	Stop(ctx context.Context) error
	// Enqueue inserts a snapshot job. Jobs with the same reason and gen that
	// have not finished coalesce into one.
	Enqueue(ctx context.Context, reason string, gen int64) (jobID int64, err error)
}

// JobInfo describes the River job a snapshot runs in.
type JobInfo struct {
	ID          int64
	Attempt     int
	MaxAttempts int
	Reason      string
}

// Work is the snapshot worker: it must run complete inside the transaction
// that stores the snapshot (or return an error).
type Work func(ctx context.Context, job JobInfo, complete InTx) error

// QueueConfig configures the River client of a Store.
type QueueConfig struct {
	Work Work
	// Retain runs a retention job (nil: retention jobs complete doing
	// nothing here).
	Retain func(ctx context.Context) error
	// Schedule is the product's periodic jobs (scheduled snapshots,
	// compaction, retention); see package jobs.
	Schedule    jobs.Schedule
	MaxAttempts int    // zero: DefaultMaxAttempts
	Instance    string // keeps coalescing keys apart between processes
	Logger      *slog.Logger
	// PollInterval is how often a driver without LISTEN (SQLite) looks for
	// jobs inserted by other processes; local inserts wake it at once.
	PollInterval time.Duration
}

// DefaultMaxAttempts bounds retries of a snapshot: a later snapshot
// supersedes a failed one anyway.
const DefaultMaxAttempts = 4

// JobKind is the River kind of snapshot jobs.
const JobKind = jobs.KindSnapshot

const queueName = jobs.QueueBackup

type snapshotArgs struct {
	Reason string `json:"reason"`
	// Gen and Instance make a coalescing key: requests that arrive before a
	// snapshot has started reading the store share one job (see coalescer).
	Gen      int64  `json:"gen,omitempty"`
	Instance string `json:"instance,omitempty"`
}

func (snapshotArgs) Kind() string { return JobKind }

func (snapshotArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: queueName}
}

// syncArgs is a continuous-replication point's job: the coalescing key only
// (its reason is ReasonSync).
type syncArgs struct {
	Gen      int64  `json:"gen,omitempty"`
	Instance string `json:"instance,omitempty"`
}

func (syncArgs) Kind() string { return jobs.KindSync }

func (syncArgs) InsertOpts() river.InsertOpts { return river.InsertOpts{Queue: queueName} }

// compactionArgs and retentionArgs are the periodic maintenance jobs.
type compactionArgs struct {
	Reason string `json:"reason,omitempty"`
}

func (compactionArgs) Kind() string { return jobs.KindCompaction }

type retentionArgs struct {
	Reason string `json:"reason,omitempty"`
}

func (retentionArgs) Kind() string { return jobs.KindRetention }

type snapshotWorker struct {
	river.WorkerDefaults[snapshotArgs]
	work Work
}

// quickRetry is every backup worker's NextRetry: River's default
// (attempt^4 seconds) would leave the session without a fresh point for
// minutes.
func quickRetry(attempt int, attempted *time.Time) time.Time {
	d := time.Duration(attempt*attempt) * 2 * time.Second
	if attempted == nil {
		return time.Now().Add(d)
	}
	return attempted.Add(d)
}

// attemptTimeout bounds one attempt of every backup job (a 100 MB store
// takes a few seconds) and stays below jobs.RescueAfter, so a slow job is
// never rescued, and run again, while it runs.
const attemptTimeout = 150 * time.Second

func (w *snapshotWorker) NextRetry(job *river.Job[snapshotArgs]) time.Time {
	return quickRetry(job.Attempt, job.AttemptedAt)
}

func (w *snapshotWorker) Timeout(*river.Job[snapshotArgs]) time.Duration { return attemptTimeout }

func (w *snapshotWorker) Work(ctx context.Context, job *river.Job[snapshotArgs]) error {
	complete := func(ctx context.Context, tx Tx) error { return tx.CompleteJob(ctx, job.JobRow) }
	return w.work(ctx, JobInfo{ID: job.ID, Attempt: job.Attempt, MaxAttempts: job.MaxAttempts, Reason: job.Args.Reason}, complete)
}

// pointWorker runs a job of kind A as a point of a fixed reason.
type pointWorker[A river.JobArgs] struct {
	river.WorkerDefaults[A]
	reason string
	work   Work
}

func (w *pointWorker[A]) NextRetry(job *river.Job[A]) time.Time {
	return quickRetry(job.Attempt, job.AttemptedAt)
}

func (w *pointWorker[A]) Timeout(*river.Job[A]) time.Duration { return attemptTimeout }

func (w *pointWorker[A]) Work(ctx context.Context, job *river.Job[A]) error {
	complete := func(ctx context.Context, tx Tx) error { return tx.CompleteJob(ctx, job.JobRow) }
	return w.work(ctx, JobInfo{ID: job.ID, Attempt: job.Attempt, MaxAttempts: job.MaxAttempts, Reason: w.reason}, complete)
}

type retentionWorker struct {
	river.WorkerDefaults[retentionArgs]
	retain func(ctx context.Context) error
}

func (w *retentionWorker) Timeout(*river.Job[retentionArgs]) time.Duration { return attemptTimeout }

func (w *retentionWorker) Work(ctx context.Context, _ *river.Job[retentionArgs]) error {
	if w.retain == nil {
		return nil
	}
	return w.retain(ctx)
}

type riverQueue[TTx any] struct {
	client   *river.Client[TTx]
	instance string
}

// NewRiverQueue builds a River client on driver (through package jobs) with
// the snapshot worker; the scheduled snapshot is in the product's Schedule.
// Stores call it from NewQueue.
func NewRiverQueue[TTx any](driver riverdriver.Driver[TTx], cfg QueueConfig) (Queue, error) {
	workers := river.NewWorkers()
	err := errors.Join(
		river.AddWorkerSafely(workers, &snapshotWorker{work: cfg.Work}),
		river.AddWorkerSafely(workers, &pointWorker[syncArgs]{reason: ReasonSync, work: cfg.Work}),
		river.AddWorkerSafely(workers, &pointWorker[compactionArgs]{reason: ReasonCompaction, work: cfg.Work}),
		river.AddWorkerSafely(workers, &retentionWorker{retain: cfg.Retain}),
	)
	if err != nil {
		return nil, fmt.Errorf("river workers: %w", err)
	}
	maxAttempts := cfg.MaxAttempts
	if maxAttempts == 0 {
		maxAttempts = DefaultMaxAttempts
	}
	client, err := jobs.NewClient(driver, jobs.Config{
		// One worker: snapshots of one store run one after the other, which
		// is what makes "the next job covers a request" hold.
		Queues:       map[string]river.QueueConfig{queueName: {MaxWorkers: 1}},
		Workers:      workers,
		Schedule:     cfg.Schedule,
		MaxAttempts:  maxAttempts,
		PollInterval: cfg.PollInterval,
		Logger:       cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	return &riverQueue[TTx]{client: client, instance: cfg.Instance}, nil
}

func (q *riverQueue[TTx]) Start(ctx context.Context) error {
	if err := q.client.Start(ctx); err != nil {
		return fmt.Errorf("start river: %w", err)
	}
	return nil
}

func (q *riverQueue[TTx]) Stop(ctx context.Context) error { return jobs.Stop(ctx, q.client) }

// uniqueStates leaves out completed, discarded, cancelled and retryable: a
// request must never coalesce into a job that is already over.
var uniqueStates = []rivertype.JobState{
	rivertype.JobStateAvailable, rivertype.JobStatePending,
	rivertype.JobStateRunning, rivertype.JobStateScheduled,
}

func (q *riverQueue[TTx]) Enqueue(ctx context.Context, reason string, gen int64) (int64, error) {
	var args river.JobArgs = snapshotArgs{Reason: reason, Gen: gen, Instance: q.instance}
	if reason == ReasonSync {
		args = syncArgs{Gen: gen, Instance: q.instance}
	}
	res, err := q.client.Insert(ctx, args, &river.InsertOpts{
		UniqueOpts: river.UniqueOpts{ByArgs: true, ByState: uniqueStates},
	})
	if err != nil {
		return 0, fmt.Errorf("enqueue %s snapshot: %w", reason, err)
	}
	return res.Job.ID, nil
}

// MigrateRiver runs River's own migrations up to the latest version.
func MigrateRiver[TTx any](ctx context.Context, driver riverdriver.Driver[TTx]) error {
	return jobs.Migrate(ctx, driver)
}
