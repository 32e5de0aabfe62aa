package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/rivertype"
)

// Channels a delivery goes out on.
const (
	ChannelNATS    = "nats"
	ChannelWebhook = "webhook"
)

// DeliveryArgs are a delivery job's args: one item, on one channel.
type DeliveryArgs struct {
	// Session is SESSION_ID: several sessions may share a database.
	Session string `json:"session"`
	Item    string `json:"item"`
	Ref     int64  `json:"ref,omitempty"`
	Key     string `json:"key,omitempty"`
	Chat    string `json:"chat,omitempty"`
	// Event is a conn event's subject suffix ("conn.connected") and Body
	// the event itself (ItemConn only: conn events are not stored apart).
	Event string          `json:"event,omitempty"`
	Body  json.RawMessage `json:"body,omitempty"`
}

// SendArgs are a send job's args.
type SendArgs struct {
	Session string `json:"session"`
	Key     string `json:"key"`
}

type natsArgs struct{ DeliveryArgs }

func (natsArgs) Kind() string { return jobs.KindRelayNATS }

type webhookArgs struct{ DeliveryArgs }

func (webhookArgs) Kind() string { return jobs.KindRelayWebhook }

type sendArgs struct{ SendArgs }

func (sendArgs) Kind() string { return jobs.KindRelaySend }

// Job is one job to insert: a delivery on Channel, or a send when Send is
// set.
type Job struct {
	Channel  string
	Delivery DeliveryArgs
	Send     *SendArgs
}

// JobInfo describes the River job a delivery or send runs in.
type JobInfo struct {
	ID          int64
	Attempt     int
	MaxAttempts int
	CreatedAt   time.Time
	// AttemptedAt is when this attempt started, on River's clock (as
	// CreatedAt): the two measure how long a delivery has been retried.
	AttemptedAt time.Time
	// FirstFailedAt is when the first attempt failed (zero: none has).
	FirstFailedAt time.Time
	// ScheduledAt is when the job was due: its place in its lane.
	ScheduledAt time.Time
}

// Cut is a job relay's stop interrupted, and when it was due.
type Cut struct {
	ID  int64
	Due time.Time
}

// Queue is relay's River client as the service sees it.
type Queue interface {
	Start(ctx context.Context) error
	// Stop waits for running jobs until ctx ends.
	Stop(ctx context.Context) error
	// PutBack makes jobs Stop interrupted due again when they were, so
	// each takes its old place in its lane (River makes an interrupted
	// job due at the stop, behind the later jobs of its chat).
	PutBack(ctx context.Context, cuts []Cut) error
	// Insert inserts jobs in a transaction of their own (inside a store
	// transaction: Tx.InsertJobs).
	Insert(ctx context.Context, jobs []Job) error
	// RetryDead puts the session's dead deliveries (discarded or cancelled)
	// back in their queues as new jobs and returns how many. One whose
	// item is gone (gone reports it: MESSAGE_RETENTION deleted it) is
	// deleted instead: it has nothing left to deliver.
	RetryDead(ctx context.Context, session string, gone func(context.Context, DeliveryArgs) bool) (int, error)
	// PruneDead deletes the session's dead jobs created before cutoff:
	// their items are deleted at the same age (MESSAGE_RETENTION).
	PruneDead(ctx context.Context, session string, cutoff time.Time) (int, error)
	// RequeueSends inserts a send job for each key of queued (the
	// session's queued sends) that has no job in a live state, then
	// deletes the dead jobs of those keys, and returns how many it
	// inserted.
	RequeueSends(ctx context.Context, session string, queued []string) (int, error)
}

// QueueConfig configures relay's River client.
type QueueConfig struct {
	// Deliver makes one delivery; an error retries it, river.JobCancel
	// makes it dead at once.
	Deliver func(ctx context.Context, channel string, job JobInfo, args DeliveryArgs) error
	// Send makes one send and must run complete inside the transaction
	// that records its outcome (or return an error to retry).
	Send func(ctx context.Context, job JobInfo, args SendArgs, complete InTx) error
	// Lanes is the number of NATS lanes, WebhookLanes of webhook lanes;
	// zero: DefaultLanes, DefaultWebhookLanes.
	Lanes        int
	WebhookLanes int
	// Backoff is the wait before retry n (1-based, Step: no jitter); zero:
	// DefaultBackoff.
	Backoff backoff.Backoff
	// SendMaxAttempts bounds a send's retries; zero: DefaultSendMaxAttempts.
	SendMaxAttempts int
	// SendTimeout bounds one send attempt; zero: DefaultSendTimeout.
	SendTimeout time.Duration
	// Schedule is the product's periodic jobs (package jobs: every client
	// carries them all).
	Schedule jobs.Schedule
	// PollInterval for drivers without LISTEN (SQLite); zero: River's.
	PollInterval time.Duration
	// StopGrace is how long running jobs may finish at Stop before their
	// contexts are cancelled; zero: until Stop's ctx ends.
	StopGrace time.Duration
	Logger    *slog.Logger
}

// Defaults of QueueConfig.
const (
	DefaultLanes = 4
	// DefaultWebhookLanes is higher: a receiver that stalls holds its
	// lane for WebhookTimeout, and every chat of that lane waits (the
	// soak's 5 % stalls made 4 lanes a backlog of minutes). A lane costs
	// one River producer, one fetch a second when idle.
	DefaultWebhookLanes    = 16
	DefaultSendMaxAttempts = 12
	// DefaultSendTimeout covers the wait for a SEND_RATE slot and the
	// gateway's answer, and stays below jobs.RescueAfter: a send rescued
	// while still running could go out twice.
	DefaultSendTimeout = 150 * time.Second
	// DeliveryMaxAttempts is high: a webhook delivery ends by
	// WEBHOOK_RETRY_FOR, a bus delivery retries until it is made (or its
	// item is pruned).
	DeliveryMaxAttempts = 10000
)

// DefaultBackoff doubles from one second up to five minutes (CONTRACT:
// webhook retries). Deliveries use its Step, not the jittered Delay: the
// schedule is documented, and a lane works one job at a time, so retries of
// many jobs never reach a receiver all at once anyway.
func DefaultBackoff() backoff.Backoff { return backoff.Backoff{Min: time.Second, Max: 5 * time.Minute} }

type deliveryWorker[A interface {
	river.JobArgs
	args() DeliveryArgs
}] struct {
	river.WorkerDefaults[A]
	channel string
	cfg     *QueueConfig
}

func (a natsArgs) args() DeliveryArgs    { return a.DeliveryArgs }
func (a webhookArgs) args() DeliveryArgs { return a.DeliveryArgs }

func info[A river.JobArgs](job *river.Job[A]) JobInfo {
	ji := JobInfo{ID: job.ID, Attempt: job.Attempt, MaxAttempts: job.MaxAttempts, CreatedAt: job.CreatedAt, ScheduledAt: job.ScheduledAt}
	if job.AttemptedAt != nil {
		ji.AttemptedAt = *job.AttemptedAt
	}
	if len(job.Errors) > 0 {
		ji.FirstFailedAt = job.Errors[0].At
	}
	return ji
}

func (w *deliveryWorker[A]) NextRetry(job *river.Job[A]) time.Time {
	return time.Now().Add(w.cfg.Backoff.Step(job.Attempt))
}

// Timeout bounds one attempt; the webhook's own timeout is shorter.
func (w *deliveryWorker[A]) Timeout(*river.Job[A]) time.Duration { return 150 * time.Second }

func (w *deliveryWorker[A]) Work(ctx context.Context, job *river.Job[A]) error {
	return w.cfg.Deliver(ctx, w.channel, info(job), job.Args.args())
}

type sendWorker struct {
	river.WorkerDefaults[sendArgs]
	cfg *QueueConfig
}

func (w *sendWorker) NextRetry(job *river.Job[sendArgs]) time.Time {
	return time.Now().Add(w.cfg.Backoff.Step(job.Attempt))
}

// Timeout is QueueConfig.SendTimeout (DefaultSendTimeout says why).
func (w *sendWorker) Timeout(*river.Job[sendArgs]) time.Duration { return w.cfg.SendTimeout }

func (w *sendWorker) Work(ctx context.Context, job *river.Job[sendArgs]) error {
	complete := func(ctx context.Context, tx Tx) error { return tx.CompleteJob(ctx, job.JobRow) }
	return w.cfg.Send(ctx, info(job), job.Args.SendArgs, complete)
}

type riverQueue[TTx any] struct {
	client *river.Client[TTx]
	cfg    QueueConfig
}

// newRiverQueue builds relay's River client on driver through package
// jobs (stores call it through River.NewQueue).
func newRiverQueue[TTx any](driver riverdriver.Driver[TTx], cfg QueueConfig) (*riverQueue[TTx], error) {
	if cfg.Lanes <= 0 {
		cfg.Lanes = DefaultLanes
	}
	if cfg.WebhookLanes <= 0 {
		cfg.WebhookLanes = DefaultWebhookLanes
	}
	if cfg.Backoff.Min <= 0 && cfg.Backoff.Max <= 0 {
		cfg.Backoff = DefaultBackoff()
	}
	if cfg.SendMaxAttempts <= 0 {
		cfg.SendMaxAttempts = DefaultSendMaxAttempts
	}
	if cfg.SendTimeout <= 0 {
		cfg.SendTimeout = DefaultSendTimeout
	}
	workers := river.NewWorkers()
	if err := errors.Join(
		river.AddWorkerSafely(workers, &deliveryWorker[natsArgs]{channel: ChannelNATS, cfg: &cfg}),
		river.AddWorkerSafely(workers, &deliveryWorker[webhookArgs]{channel: ChannelWebhook, cfg: &cfg}),
		river.AddWorkerSafely(workers, &sendWorker{cfg: &cfg}),
	); err != nil {
		return nil, fmt.Errorf("river workers: %w", err)
	}
	queues := map[string]river.QueueConfig{
		// One send at a time: SEND_RATE paces them in order.
		jobs.QueueRelaySend: {MaxWorkers: 1},
	}
	// One worker per lane keeps a chat in order; a short fetch cooldown
	// lets that one worker take the next job at once.
	for kind, lanes := range map[string]int{jobs.KindRelayNATS: cfg.Lanes, jobs.KindRelayWebhook: cfg.WebhookLanes} {
		for lane := range lanes {
			queues[jobs.RelayLaneQueue(kind, lane)] = river.QueueConfig{MaxWorkers: 1, FetchCooldown: river.FetchCooldownMin}
		}
	}
	client, err := jobs.NewClient(driver, jobs.Config{
		Queues:       queues,
		Workers:      workers,
		Schedule:     cfg.Schedule,
		MaxAttempts:  DeliveryMaxAttempts,
		PollInterval: cfg.PollInterval,
		StopGrace:    cfg.StopGrace,
		Logger:       cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	return &riverQueue[TTx]{client: client, cfg: cfg}, nil
}

func (q *riverQueue[TTx]) Start(ctx context.Context) error {
	if err := q.client.Start(ctx); err != nil {
		return fmt.Errorf("start river: %w", err)
	}
	return nil
}

func (q *riverQueue[TTx]) Stop(ctx context.Context) error { return jobs.Stop(ctx, q.client) }

// PutBack sets each cut job's scheduled_at back while it is still
// available (not yet taken by another relay). River has no call for it:
// the statement is plain SQL on its table, the time in the form each
// driver stores.
func (q *riverQueue[TTx]) PutBack(ctx context.Context, cuts []Cut) error {
	driver := q.client.Driver()
	exec := driver.GetExecutor()
	for _, c := range cuts {
		var due any = c.Due.UTC()
		if driver.DatabaseName() == riverdriver.DatabaseNameSQLite {
			// riversqlite's own format: other forms store fine and then
			// compare wrongly with its times.
			due = c.Due.UTC().Round(time.Millisecond).Format("2006-01-02 15:04:05.000")
		}
		if err := exec.Exec(ctx, `UPDATE river_job SET scheduled_at = $1 WHERE id = $2 AND state = 'available'`, due, c.ID); err != nil {
			return fmt.Errorf("put back job %d: %w", c.ID, err)
		}
	}
	return nil
}

// lane is the lane of a chat among lanes: every delivery of one chat on
// one channel goes through the same one.
func lane(chat string, lanes int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(chat))
	return int(h.Sum32() % uint32(lanes))
}

func (q *riverQueue[TTx]) params(j Job) (river.InsertManyParams, error) {
	if j.Send != nil {
		return river.InsertManyParams{Args: sendArgs{*j.Send}, InsertOpts: &river.InsertOpts{
			Queue: jobs.QueueRelaySend, MaxAttempts: q.cfg.SendMaxAttempts}}, nil
	}
	// scheduled_at orders a lane (River fetches by it, then by id). Read
	// here, after the seq was taken and under its lock, it grows with seq;
	// left to the database it would be the transaction's start, which two
	// concurrent inserts may reach in the other order. It is wall time on
	// purpose: River compares it with its own clock.
	opts := &river.InsertOpts{ScheduledAt: time.Now()}
	var args river.JobArgs
	switch j.Channel {
	case ChannelNATS:
		args = natsArgs{j.Delivery}
		opts.Queue = jobs.RelayLaneQueue(jobs.KindRelayNATS, lane(j.Delivery.Chat, q.cfg.Lanes))
	case ChannelWebhook:
		args = webhookArgs{j.Delivery}
		opts.Queue = jobs.RelayLaneQueue(jobs.KindRelayWebhook, lane(j.Delivery.Chat, q.cfg.WebhookLanes))
	default:
		return river.InsertManyParams{}, fmt.Errorf("relay: unknown channel %q", j.Channel)
	}
	return river.InsertManyParams{Args: args, InsertOpts: opts}, nil
}

// insertTx inserts jobs in the store transaction tx (Tx.InsertJobs).
func (q *riverQueue[TTx]) insertTx(ctx context.Context, tx TTx, list []Job) error {
	params := make([]river.InsertManyParams, 0, len(list))
	for _, j := range list {
		p, err := q.params(j)
		if err != nil {
			return err
		}
		params = append(params, p)
	}
	if _, err := q.client.InsertManyFastTx(ctx, tx, params); err != nil {
		return fmt.Errorf("insert jobs: %w", err)
	}
	return nil
}

func (q *riverQueue[TTx]) Insert(ctx context.Context, list []Job) error {
	params := make([]river.InsertManyParams, 0, len(list))
	for _, j := range list {
		p, err := q.params(j)
		if err != nil {
			return err
		}
		params = append(params, p)
	}
	if _, err := q.client.InsertManyFast(ctx, params); err != nil {
		return fmt.Errorf("insert jobs: %w", err)
	}
	return nil
}

// PruneDead deletes, page by page, the session's dead relay jobs that
// were created before cutoff.
func (q *riverQueue[TTx]) PruneDead(ctx context.Context, session string, cutoff time.Time) (int, error) {
	n := 0
	params := river.NewJobListParams().
		Kinds(jobs.KindRelayNATS, jobs.KindRelayWebhook, jobs.KindRelaySend).
		States(rivertype.JobStateDiscarded, rivertype.JobStateCancelled).
		First(500)
	for {
		res, err := q.client.JobList(ctx, params)
		if err != nil {
			return n, fmt.Errorf("list dead jobs: %w", err)
		}
		var old []int64
		for _, row := range res.Jobs {
			var a struct {
				Session string `json:"session"`
			}
			if json.Unmarshal(row.EncodedArgs, &a) == nil && a.Session == session && row.CreatedAt.Before(cutoff) {
				old = append(old, row.ID)
			}
		}
		if len(old) > 0 {
			del, err := q.client.JobDeleteMany(ctx, river.NewJobDeleteManyParams().IDs(old...).First(len(old)))
			if err != nil {
				return n, fmt.Errorf("delete dead jobs: %w", err)
			}
			n += len(del.Jobs)
		}
		if len(res.Jobs) == 0 || res.LastCursor == nil {
			return n, nil
		}
		params = params.After(res.LastCursor)
	}
}

// RetryDead inserts each dead delivery again as a new job (a fresh start
// for WEBHOOK_RETRY_FOR), then deletes the dead one. A crash in between
// leaves the dead job too: retried again later, it delivers twice, which
// at-least-once allows.
func (q *riverQueue[TTx]) RetryDead(ctx context.Context, session string, gone func(context.Context, DeliveryArgs) bool) (int, error) {
	n := 0
	params := river.NewJobListParams().
		Kinds(jobs.KindRelayNATS, jobs.KindRelayWebhook).
		States(rivertype.JobStateDiscarded, rivertype.JobStateCancelled).
		First(500)
	for {
		res, err := q.client.JobList(ctx, params)
		if err != nil {
			return n, fmt.Errorf("list dead deliveries: %w", err)
		}
		for _, row := range res.Jobs {
			var a DeliveryArgs
			if err := json.Unmarshal(row.EncodedArgs, &a); err != nil || a.Session != session {
				continue
			}
			if gone(ctx, a) {
				if _, err := q.client.JobDelete(ctx, row.ID); err != nil && !errors.Is(err, rivertype.ErrNotFound) {
					return n, fmt.Errorf("delete dead delivery %d: %w", row.ID, err)
				}
				continue
			}
			channel := ChannelNATS
			if row.Kind == jobs.KindRelayWebhook {
				channel = ChannelWebhook
			}
			p, err := q.params(Job{Channel: channel, Delivery: a})
			if err != nil {
				return n, err
			}
			if _, err := q.client.Insert(ctx, p.Args, p.InsertOpts); err != nil {
				return n, fmt.Errorf("retry delivery %d: %w", row.ID, err)
			}
			if _, err := q.client.JobDelete(ctx, row.ID); err != nil && !errors.Is(err, rivertype.ErrNotFound) {
				return n, fmt.Errorf("retry delivery %d: %w", row.ID, err)
			}
			n++
		}
		if len(res.Jobs) == 0 || res.LastCursor == nil {
			return n, nil
		}
		params = params.After(res.LastCursor)
	}
}
