package backup

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// The service's side of the pipeline: who asks for a point (P.backup.request,
// the gateway's paired and stopped events, River's schedule), where it runs
// (a River job, or directly while the database is down), and what is said
// about it (events, the heartbeat's last snapshot).

// onBackupRequest handles P.backup.request.
func (s *Service) onBackupRequest(m *nats.Msg) {
	req, err := bus.DecodeBackupRequest(m.Data)
	if err != nil {
		if m.Reply != "" {
			_ = bus.Respond(m, bus.BackupReply{OK: false, Error: err.Error()})
		}
		return
	}
	s.request(req.Reason, m)
}

// request asks the pipeline for a point that covers now; m (when it has a
// reply subject) is answered once that point is committed.
func (s *Service) request(reason string, m *nats.Msg) {
	want := m != nil && m.Reply != ""
	s.mu.Lock()
	standby := s.inStandby
	s.mu.Unlock()
	if standby {
		// The session is another instance's now: nothing of ours to store.
		if want {
			_ = bus.Respond(m, reply(Outcome{Err: ErrStandby}))
		}
		return
	}
	w, gen, enqueue := s.pipe.Want(reason, want)
	if enqueue {
		if _, q := s.backend(); q != nil {
			ctx, cancel := s.lifeTimeout(10 * time.Second)
			_, err := q.Enqueue(ctx, reason, gen)
			cancel()
			if err != nil {
				level := slog.LevelWarn
				if reason == ReasonSync {
					level = slog.LevelDebug // once a SYNC_INTERVAL: the failed points say it once a minute
				}
				s.log.Log(ctx, level, "enqueue failed; the point goes to the local fallback", "reason", reason, "err", err)
				s.noteErr(err)
				s.noteDB(false)
				s.lease.Kick() // probe the database until it answers, then ship the local snapshot
				s.spawn(func() { s.direct(reason) })
			}
		} else {
			s.spawn(func() { s.direct(reason) })
		}
	}
	if w == nil {
		return
	}
	spawned := s.spawn(func() {
		var o Outcome
		select {
		case o = <-w.Done():
		case <-s.clock.After(s.cfg.ReplyTimeout):
			w.Cancel()
			o = Outcome{Err: errors.New("no snapshot committed within " + s.cfg.ReplyTimeout.String())}
		case <-s.stopping:
			w.Cancel()
			o = Outcome{Err: ErrStopping}
		}
		_ = bus.Respond(m, reply(o))
	})
	if !spawned {
		w.Cancel()
		_ = bus.Respond(m, reply(Outcome{Err: ErrStopping}))
	}
}

// lifeTimeout bounds a handler's call by d on the service's clock; Run's
// end cancels it.
func (s *Service) lifeTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return clockctx.WithTimeout(s.life, s.clock, d)
}

// spawn runs f in a tracked goroutine unless Run is ending: a NATS callback
// may still be running after Unsubscribe.
func (s *Service) spawn(f func()) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.closed {
		return false
	}
	s.handlers.Go(f)
	return true
}

func reply(o Outcome) bus.BackupReply {
	if o.Err != nil {
		return bus.BackupReply{OK: false, JobID: o.JobID, Error: o.Err.Error()}
	}
	ref := o.Ref
	return bus.BackupReply{OK: true, JobID: o.JobID, Snapshot: &ref, Stored: o.Where}
}

// direct takes a point outside River: the database is unreachable, so it
// goes to the local fallback only.
func (s *Service) direct(reason string) {
	ctx, cancel := s.lifeTimeout(5 * time.Minute)
	defer cancel()
	_, _ = s.pipe.Point(ctx, Run{Job: JobInfo{Reason: reason, Attempt: 1, MaxAttempts: 1}})
}

// work is the River worker.
func (s *Service) work(ctx context.Context, job JobInfo, complete InTx) error {
	st, _ := s.backend()
	run := Run{Job: job, InTx: complete}
	if st != nil {
		run.Catalog = st
	}
	_, err := s.pipe.Point(ctx, run)
	if errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoSession) || errors.Is(err, ErrLeaseLost) {
		return nil // nothing to store (or not ours to store) is not a failure to retry
	}
	return err
}

// databaseCall is the pipeline's word on a database call: a failure also
// wakes the lease keeper, which probes until the database answers.
func (s *Service) databaseCall(ok bool) {
	s.noteDB(ok)
	if !ok {
		s.lease.Kick()
	}
}

// report publishes a point's end (P.backup.done or P.backup.failed) and
// keeps the heartbeat's last snapshot.
func (s *Service) report(job JobInfo, o Outcome, d time.Duration) {
	now := s.clock.Now()
	quiet := job.Reason == ReasonSync // continuous: the minute's summary speaks for them
	if o.Err != nil {
		if errors.Is(o.Err, ErrNoDevice) || errors.Is(o.Err, ErrNoSession) {
			if !quiet {
				s.log.Info("snapshot skipped", "reason", job.Reason, "why", o.Err)
			}
			return
		}
		s.noteErr(o.Err)
		if quiet && !s.failureWorthLogging(now) {
			return
		}
		s.log.Warn("snapshot failed", "reason", job.Reason, "attempt", job.Attempt, "err", o.Err)
		ev := bus.BackupFailed{Reason: job.Reason, Error: o.Err.Error(), Attempt: job.Attempt}
		ev.Stamp(s.cfg.SessionID, now)
		_ = bus.Publish(s.opts.NC, s.subj.BackupFailed(), ev)
		return
	}
	s.mu.Lock()
	ref := o.Ref
	s.lastSnap, s.lastSnapAt = &ref, &now
	if ref.ID != 0 {
		s.lastDBSnapID = ref.ID
	}
	s.mu.Unlock()
	if quiet {
		return
	}
	s.log.Info("snapshot done", "reason", job.Reason, "id", s.storedID(o.Ref.ID), "bytes", o.Ref.Bytes, "unchanged", o.Ref.Unchanged,
		"duration", d, "job_id", job.ID)
	ev := bus.BackupDone{SnapshotID: o.Ref.ID, Reason: job.Reason, Bytes: o.Ref.Bytes, StoredBytes: o.Stored,
		SHA256: o.Ref.SHA256, DurationMS: d.Milliseconds(), Unchanged: o.Ref.Unchanged, JobID: job.ID}
	ev.Stamp(s.cfg.SessionID, now)
	_ = bus.Publish(s.opts.NC, s.subj.BackupDone(), ev)
}

// failureWorthLogging spaces the logs of failed sync points to one a
// minute: a database outage would otherwise log one a SYNC_INTERVAL.
func (s *Service) failureWorthLogging(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.lastSyncFailLog.IsZero() && now.Sub(s.lastSyncFailLog) < summaryEvery {
		return false
	}
	s.lastSyncFailLog = now
	return true
}

// shipLocal has the pipeline store in the database now what reached the
// local fallback only: the database answers again, and a kill now must not
// lose that point.
func (s *Service) shipLocal() {
	st, _ := s.backend()
	if st == nil || !s.pipe.Unshipped() {
		return
	}
	s.spawn(func() {
		ctx, cancel := s.lifeTimeout(5 * time.Minute)
		defer cancel()
		o, ran, err := s.pipe.Ship(ctx, st)
		if ran && err == nil {
			s.log.Info("the session kept in the local fallback during the database outage is in the database now", "snapshot_id", s.storedID(o.Ref.ID))
		} // else the next probe tries again
	})
}

// storedID is how the log names what the pipeline stored, as `blacksky
// snapshots` lists it and `blacksky restore --id` takes it: "p17" for a point
// (continuous replication), "17" for a full snapshot, "0" for the local
// fallback. A bare 17 for a point would send an operator to full snapshot 17.
func (s *Service) storedID(id int64) string {
	if s.incr != nil && id != 0 {
		return "p" + strconv.FormatInt(id, 10)
	}
	return strconv.FormatInt(id, 10)
}
