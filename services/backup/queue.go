package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/rivermigrate"
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

// Work is the snapshot worker: it must call complete inside the transaction
// that stores the snapshot (or return an error).
type Work func(ctx context.Context, job JobInfo, complete TxHook) error

// QueueConfig configures the River client of a Store.
type QueueConfig struct {
	Work        Work
	Interval    time.Duration // scheduled snapshots; zero: none
	MaxAttempts int           // zero: DefaultMaxAttempts
	Instance    string        // keeps coalescing keys apart between processes
	Logger      *slog.Logger
	// PollInterval is how often a driver without LISTEN (SQLite) looks for
	// jobs inserted by other processes; local inserts wake it at once.
	PollInterval time.Duration
}

// DefaultMaxAttempts bounds retries of a snapshot: a later snapshot
// supersedes a failed one anyway.
const DefaultMaxAttempts = 4

// JobKind is the River kind of snapshot jobs.
const JobKind = "blacksky_snapshot"

const queueName = "blacksky_backup"

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

type snapshotWorker[TTx any] struct {
	river.WorkerDefaults[snapshotArgs]
	work Work
}

// NextRetry retries quickly: the default (attempt^4 seconds) would leave the
// session without a fresh snapshot for minutes.
func (w *snapshotWorker[TTx]) NextRetry(job *river.Job[snapshotArgs]) time.Time {
	d := time.Duration(job.Attempt*job.Attempt) * 2 * time.Second
	return job.AttemptedAt.Add(d)
}

// Timeout bounds one attempt; a 100 MB store takes a few seconds.
func (w *snapshotWorker[TTx]) Timeout(*river.Job[snapshotArgs]) time.Duration { return 5 * time.Minute }

func (w *snapshotWorker[TTx]) Work(ctx context.Context, job *river.Job[snapshotArgs]) error {
	complete := func(ctx context.Context, tx any) error {
		t, ok := tx.(TTx)
		if !ok {
			return fmt.Errorf("complete job: transaction is %T", tx)
		}
		_, err := river.JobCompleteTx[riverdriver.Driver[TTx]](ctx, t, job)
		return err
	}
	return w.work(ctx, JobInfo{ID: job.ID, Attempt: job.Attempt, MaxAttempts: job.MaxAttempts, Reason: job.Args.Reason}, complete)
}

type riverQueue[TTx any] struct {
	client   *river.Client[TTx]
	instance string
}

// NewRiverQueue builds a River client on driver with the snapshot worker and
// the periodic scheduled snapshot. Stores call it from NewQueue.
func NewRiverQueue[TTx any](driver riverdriver.Driver[TTx], cfg QueueConfig) (Queue, error) {
	workers := river.NewWorkers()
	if err := river.AddWorkerSafely(workers, &snapshotWorker[TTx]{work: cfg.Work}); err != nil {
		return nil, fmt.Errorf("river workers: %w", err)
	}
	maxAttempts := cfg.MaxAttempts
	if maxAttempts == 0 {
		maxAttempts = DefaultMaxAttempts
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rc := &river.Config{
		// One worker: snapshots of one store run one after the other, which
		// is what makes "the next job covers a request" hold.
		Queues:      map[string]river.QueueConfig{queueName: {MaxWorkers: 1}},
		Workers:     workers,
		MaxAttempts: maxAttempts,
		Logger:      log.With("component", "river"),
		// Completed snapshot jobs are only history; keep a day of it.
		CompletedJobRetentionPeriod: 24 * time.Hour,
	}
	if cfg.PollInterval > 0 {
		rc.FetchPollInterval = cfg.PollInterval
		rc.FetchCooldown = min(river.FetchCooldownDefault, cfg.PollInterval)
	}
	if cfg.Interval > 0 {
		interval := cfg.Interval
		rc.PeriodicJobs = []*river.PeriodicJob{river.NewPeriodicJob(
			river.PeriodicInterval(interval),
			func() (river.JobArgs, *river.InsertOpts) {
				return snapshotArgs{Reason: "scheduled"}, &river.InsertOpts{
					UniqueOpts: river.UniqueOpts{ByArgs: true, ByPeriod: interval},
				}
			},
			&river.PeriodicJobOpts{ID: "blacksky_scheduled_snapshot"},
		)}
	}
	client, err := river.NewClient(driver, rc)
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	return &riverQueue[TTx]{client: client, instance: cfg.Instance}, nil
}

func (q *riverQueue[TTx]) Start(ctx context.Context) error {
	if err := q.client.Start(ctx); err != nil {
		return fmt.Errorf("start river: %w", err)
	}
	return nil
}

func (q *riverQueue[TTx]) Stop(ctx context.Context) error {
	err := q.client.Stop(ctx)
	// ctx may end by a cancel with a deadline cause (withTimeout on the
	// injected clock): any end of ctx means out of time.
	if err != nil && (errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil) {
		// Out of time: cancel the running job rather than hang the shutdown.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = q.client.StopAndCancel(cctx)
	}
	if err != nil {
		return fmt.Errorf("stop river: %w", err)
	}
	return nil
}

// uniqueStates leaves out completed, discarded, cancelled and retryable: a
// request must never coalesce into a job that is already over.
var uniqueStates = []rivertype.JobState{
	rivertype.JobStateAvailable, rivertype.JobStatePending,
	rivertype.JobStateRunning, rivertype.JobStateScheduled,
}

func (q *riverQueue[TTx]) Enqueue(ctx context.Context, reason string, gen int64) (int64, error) {
	res, err := q.client.Insert(ctx, snapshotArgs{Reason: reason, Gen: gen, Instance: q.instance}, &river.InsertOpts{
		UniqueOpts: river.UniqueOpts{ByArgs: true, ByState: uniqueStates},
	})
	if err != nil {
		return 0, fmt.Errorf("enqueue %s snapshot: %w", reason, err)
	}
	return res.Job.ID, nil
}

// MigrateRiver runs River's own migrations up to the latest version.
func MigrateRiver[TTx any](ctx context.Context, driver riverdriver.Driver[TTx]) error {
	m, err := rivermigrate.New(driver, &rivermigrate.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("river migrator: %w", err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("river migrations: %w", err)
	}
	return nil
}
