// Package jobs is the one place River clients are built: every service that
// queues work in the database (backup's snapshots, relay's deliveries and
// sends) gets its client from NewClient, and this file lists every job kind,
// queue and periodic job of the product.
//
// Why one list: River enqueues periodic jobs, moves retryable and scheduled
// jobs back to available and cleans old jobs only on the elected leader,
// one client among all clients of the database, whatever process they are
// in. A periodic job configured on one service's client alone would never
// run while another service's client leads (backup's scheduled snapshot
// stopped whenever relay led). So every client carries the whole Schedule
// and may insert any kind (SkipUnknownJobCheck); each works only its own
// queues, and a job waits in its queue until the service that works it runs.
package jobs

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

// Queues and kinds of every job of the product.
const (
	// QueueBackup runs backup's snapshot jobs, one at a time.
	QueueBackup = "blacksky_backup"
	// KindSnapshot is a backup snapshot job; args {"reason": ...}.
	KindSnapshot = "blacksky_snapshot"
	// PeriodicSnapshotID names the scheduled snapshot's periodic job.
	PeriodicSnapshotID = "blacksky_scheduled_snapshot"

	// KindRelayNATS delivers one item on the bus (P.msg.in, P.msg.receipt,
	// P.msg.sent, P.msg.send_failed; into JetStream when the server has
	// it). KindRelayWebhook posts one item to WEBHOOK_URL. Both run in
	// lanes: RelayLaneQueue(kind, lane).
	KindRelayNATS    = "blacksky_relay_nats"
	KindRelayWebhook = "blacksky_relay_webhook"
	// KindRelaySend asks the gateway to send one queued message; its queue
	// runs one job at a time, paced by SEND_RATE.
	KindRelaySend  = "blacksky_relay_send"
	QueueRelaySend = "blacksky_relay_send"

	// KindSync is a continuous-replication point (SYNC_INTERVAL): the store
	// changed; args {"gen": ..., "instance": ...}, unique while waiting, so
	// commits coalesce into one job.
	KindSync = "blacksky_sync"
	// KindCompaction takes a new base of the session when one is due
	// (backup's compaction policy); periodic.
	KindCompaction = "blacksky_compaction"
	// KindRetention deletes the points and snapshots BACKUP_RETENTION no
	// longer keeps and the pieces nothing references; periodic.
	KindRetention = "blacksky_retention"
	// PeriodicCompactionID and PeriodicRetentionID name those periodic jobs.
	PeriodicCompactionID = "blacksky_compaction"
	PeriodicRetentionID  = "blacksky_retention"
)

// RelayLaneQueue is the queue of one lane of relay's deliveries of kind
// (KindRelayNATS or KindRelayWebhook): relay hashes each chat to a lane, and
// a lane runs one job at a time, which keeps a chat's deliveries in order.
func RelayLaneQueue(kind string, lane int) string { return fmt.Sprintf("%s_%d", kind, lane) }

// Schedule is the product's periodic jobs. Every client is built with the
// same Schedule (cmd builds it from the configuration), so the leader
// enqueues all of them. Zero intervals leave a job out.
type Schedule struct {
	// BackupInterval is BACKUP_INTERVAL: a "scheduled" snapshot job.
	BackupInterval time.Duration
	// Compaction and Retention space backup's compaction check and
	// retention jobs (both in QueueBackup, so they never run beside a
	// point of the same session).
	Compaction time.Duration
	Retention  time.Duration
}

// BackupMaintenance is how often compaction and retention run when
// continuous replication is on (SYNC_INTERVAL > 0): Schedule's Compaction
// and Retention for every client cmd builds.
const BackupMaintenance = 10 * time.Minute

// periodicArgs is a periodic job's args as inserted: the kind and queue of
// the service that works it, and a JSON body that service's own args type
// decodes. It lets this package schedule jobs without importing the
// services that define them.
type periodicArgs struct {
	kind, queue string
	Reason      string `json:"reason,omitempty"`
}

func (a periodicArgs) Kind() string { return a.kind }

func (a periodicArgs) InsertOpts() river.InsertOpts { return river.InsertOpts{Queue: a.queue} }

// PeriodicJobs returns s as River periodic jobs.
func (s Schedule) PeriodicJobs() []*river.PeriodicJob {
	var out []*river.PeriodicJob
	if d := s.BackupInterval; d > 0 {
		out = append(out, river.NewPeriodicJob(
			river.PeriodicInterval(d),
			func() (river.JobArgs, *river.InsertOpts) {
				return periodicArgs{kind: KindSnapshot, queue: QueueBackup, Reason: "scheduled"}, &river.InsertOpts{
					Queue:      QueueBackup,
					UniqueOpts: river.UniqueOpts{ByArgs: true, ByPeriod: d},
				}
			},
			&river.PeriodicJobOpts{ID: PeriodicSnapshotID},
		))
	}
	for _, pj := range []struct {
		every      time.Duration
		kind, id   string
		reasonText string
	}{
		{s.Compaction, KindCompaction, PeriodicCompactionID, "compaction"},
		{s.Retention, KindRetention, PeriodicRetentionID, "retention"},
	} {
		if pj.every <= 0 {
			continue
		}
		out = append(out, river.NewPeriodicJob(
			river.PeriodicInterval(pj.every),
			func() (river.JobArgs, *river.InsertOpts) {
				return periodicArgs{kind: pj.kind, queue: QueueBackup, Reason: pj.reasonText}, &river.InsertOpts{
					Queue:      QueueBackup,
					UniqueOpts: river.UniqueOpts{ByArgs: true, ByPeriod: pj.every},
				}
			},
			// On start too: a process restarted more often than the
			// interval would otherwise never compact or prune.
			&river.PeriodicJobOpts{ID: pj.id, RunOnStart: true},
		))
	}
	return out
}

// RescueAfter is how long a job may run before River's rescuer (on the
// leader) takes it for stuck and retries it: what brings back the jobs a
// SIGKILLed process was running (River's default is an hour, an hour with
// messages undelivered). Every worker's Timeout must stay below it, or a
// slow job would run twice at once.
const RescueAfter = 3 * time.Minute

// DeadRetention is how long River keeps dead jobs (cancelled or
// discarded) before its cleaner deletes them. River's defaults (a day for
// cancelled ones) lost relay's dead deliveries before an operator back
// from a weekend could retry them. Like the schedule it is product-wide:
// the cleaner runs on the leader, with the leader's setting. Relay deletes
// its own dead deliveries sooner, with their messages (MESSAGE_RETENTION).
const DeadRetention = 30 * 24 * time.Hour

// Config builds one service's River client. Zero values are defaults.
type Config struct {
	// Queues the client works, with their worker counts.
	Queues  map[string]river.QueueConfig
	Workers *river.Workers
	// Schedule is the product's whole periodic set (see the package doc).
	Schedule Schedule
	// MaxAttempts is the default for jobs that do not set their own; zero:
	// River's default (25).
	MaxAttempts int
	// PollInterval is how often a driver without LISTEN (SQLite) looks for
	// jobs inserted by other processes; local inserts wake it at once. Zero:
	// River's default.
	PollInterval time.Duration
	// CompletedRetention keeps completed jobs as history; zero: a day.
	CompletedRetention time.Duration
	// StopGrace is how long running jobs may go on once Stop is called
	// before their contexts are cancelled (River's SoftStopTimeout): the
	// jobs then end, their outcome is recorded and Stop returns. Zero: no
	// limit but Stop's ctx.
	StopGrace time.Duration
	Logger    *slog.Logger
}

// NewClient builds a River client on driver.
func NewClient[TTx any](driver riverdriver.Driver[TTx], cfg Config) (*river.Client[TTx], error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rc := &river.Config{
		Queues:                      cfg.Queues,
		Workers:                     cfg.Workers,
		MaxAttempts:                 cfg.MaxAttempts,
		Logger:                      slog.New(quietHandler{next: log.With("component", "river").Handler()}),
		CompletedJobRetentionPeriod: cfg.CompletedRetention,
		PeriodicJobs:                cfg.Schedule.PeriodicJobs(),
		SkipUnknownJobCheck:         true,
		RescueStuckJobsAfter:        RescueAfter,
		SoftStopTimeout:             cfg.StopGrace,
		CancelledJobRetentionPeriod: DeadRetention,
		DiscardedJobRetentionPeriod: DeadRetention,
	}
	if cfg.Workers != nil {
		if err := addStandIns(cfg.Workers); err != nil {
			return nil, err
		}
	}
	// Wall time: River compares scheduled_at with its own clock.
	rc.Middleware = []rivertype.Middleware{&availableWhenDue{now: time.Now}}
	if rc.CompletedJobRetentionPeriod == 0 {
		rc.CompletedJobRetentionPeriod = 24 * time.Hour
	}
	if cfg.PollInterval > 0 {
		rc.FetchPollInterval = cfg.PollInterval
		rc.FetchCooldown = min(river.FetchCooldownDefault, cfg.PollInterval)
	}
	client, err := river.NewClient(driver, rc)
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	return client, nil
}

// Stop stops client, waiting for running jobs until ctx ends; then it
// cancels them rather than hang a shutdown.
func Stop[TTx any](ctx context.Context, client *river.Client[TTx]) error {
	err := client.Stop(ctx)
	// ctx may end by a cancel with a deadline cause (a timeout on an
	// injected clock): any end of ctx means out of time.
	if err != nil && (errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = client.StopAndCancel(cctx)
	}
	if err != nil {
		return fmt.Errorf("stop river: %w", err)
	}
	return nil
}

// Migrate runs River's own migrations up to the latest version.
func Migrate[TTx any](ctx context.Context, driver riverdriver.Driver[TTx]) error {
	m, err := rivermigrate.New(driver, &rivermigrate.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("river migrator: %w", err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("river migrations: %w", err)
	}
	return nil
}
