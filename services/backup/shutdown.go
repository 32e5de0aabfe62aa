package backup

import (
	"context"
	"errors"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// shutdown takes the shutdown snapshot (a River job, awaited; the local
// fallback when the database is gone), stops River and releases the lease,
// all before one deadline: 70% of SHUTDOWN_TIMEOUT from now (the gateway has
// used some of it already).
func (s *Service) shutdown(bgCancel context.CancelFunc) {
	s.mu.Lock()
	s.state = bus.StateStopping
	s.mu.Unlock()
	budget := s.cfg.ShutdownTimeout * 7 / 10
	ctx, cancel := clockctx.WithTimeout(context.Background(), s.clock, budget)
	defer cancel()

	// Background loops first: reconnect must not swap the store under us.
	bgCancel()
	s.bgWG.Wait()
	s.lease.Stop()

	st, q := s.backend()
	s.mu.Lock()
	restored := s.epoch.done && s.epoch.reply.OK
	s.mu.Unlock()
	saved := false
	if restored {
		saved = s.shutdownSnapshot(ctx, q, budget*55/100)
	}
	if q != nil {
		sctx, scancel := clockctx.WithTimeout(ctx, s.clock, budget*15/100)
		if err := q.Stop(sctx); err != nil {
			s.log.Warn("river stop", "err", err)
		}
		scancel()
	}
	if st != nil {
		switch {
		case saved:
			s.lease.Release(ctx, st)
		case !restored:
			// The gateway never opened the store (restore refused, or not
			// done yet): nothing of this process to protect.
			s.lease.Release(ctx, st)
		default:
			s.log.Warn("shutdown snapshot not in the database; a standby takes the lease after a lease TTL", "ttl", s.cfg.LeaseTTL)
		}
		st.Close()
	}
}

// shutdownSnapshot returns whether the session is safe in the database (a
// new or unchanged snapshot, or nothing worth storing).
func (s *Service) shutdownSnapshot(ctx context.Context, q Queue, wait time.Duration) bool {
	if q != nil {
		w, gen, _ := s.pipe.Want(bus.ReasonShutdown, true)
		// Always insert: a pending shutdown job from conn.stopped may have
		// read the store before the gateway's last writes.
		ectx, cancel := clockctx.WithTimeout(ctx, s.clock, wait)
		defer cancel()
		if _, err := q.Enqueue(ectx, bus.ReasonShutdown, gen); err == nil {
			select {
			case o := <-w.Done():
				if o.Err == nil || errors.Is(o.Err, ErrNoDevice) || errors.Is(o.Err, ErrNoSession) {
					return o.Err == nil && o.Ref.ID != 0 || o.Err != nil
				}
				s.log.Warn("shutdown snapshot failed; writing the local fallback", "err", o.Err)
			case <-ectx.Done():
				w.Cancel()
				s.log.Warn("shutdown snapshot not done in time; writing the local fallback")
			}
		} else {
			w.Cancel()
			s.log.Warn("shutdown snapshot not queued; writing the local fallback", "err", err)
		}
	}
	o, err := s.pipe.Point(ctx, Run{Job: JobInfo{Reason: bus.ReasonShutdown, Attempt: 1, MaxAttempts: 1}})
	switch {
	case errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoSession):
	case err != nil:
		s.log.Error("shutdown snapshot to the local fallback failed", "err", err)
	case s.cfg.Heroku:
		// Heroku wipes the disk when the dyno stops: what is not in the
		// database now is gone for the next dyno.
		s.log.Error("SHUTDOWN SNAPSHOT NOT IN THE DATABASE: it is on this dyno's disk only, which Heroku wipes; "+
			"the next dyno restores the database's older snapshot and the session changes since then are lost",
			"sha256", o.Ref.SHA256, "last_database_snapshot_id", s.lastDatabaseSnapshot())
	default:
		s.log.Warn("shutdown snapshot in the local fallback only; the next start on this disk restores it", "sha256", o.Ref.SHA256)
	}
	return false
}
