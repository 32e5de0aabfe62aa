package backup

import (
	"context"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// The service's side of continuous replication: a sync loop per lease epoch
// turns noticed commits into at most one point request per SYNC_INTERVAL,
// and says once a minute what was shipped; retention runs as a River job in
// the pipeline's turn.

// summaryEvery spaces the replication summary lines.
const summaryEvery = time.Minute

// syncLoop runs for one epoch while continuous replication is on: the
// watcher's changes become point requests, spaced by SyncInterval (a burst
// of commits within one interval costs one point), and a summary is logged
// every minute.
func (s *Service) syncLoop(ctx context.Context) {
	p := s.incr
	changed := make(chan struct{}, 1)
	s.bgWG.Go(func() {
		p.RunWatcher(ctx, s.cfg.WatchPoll, func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		})
	})
	s.refreshStats(ctx)
	summary := s.clock.NewTicker(summaryEvery)
	defer summary.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-summary.Chan():
			s.summarize(ctx)
			continue
		case <-changed:
		}
		if wait := s.cfg.SyncInterval - s.clock.Since(last); !last.IsZero() && wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-s.clock.After(wait):
			}
		}
		last = s.clock.Now()
		s.request(ReasonSync, nil)
	}
}

// refreshStats reads the catalog's totals for the heartbeat.
func (s *Service) refreshStats(ctx context.Context) {
	st, _ := s.backend()
	if st == nil {
		return
	}
	cctx, cancel := clockctx.WithTimeout(ctx, s.clock, dbCallTimeout)
	stats, err := st.PointStats(cctx, s.cfg.SessionID)
	cancel()
	if err != nil {
		return
	}
	s.incr.mu.Lock()
	s.incr.stats.catalog, s.incr.stats.catalogKnown = stats, true
	s.incr.mu.Unlock()
}

// summarize logs the minute's replication in one line.
func (s *Service) summarize(ctx context.Context) {
	s.refreshStats(ctx)
	p := s.incr
	p.mu.Lock()
	st := p.stats
	p.stats.points, p.stats.bases, p.stats.bytes = 0, 0, 0
	p.mu.Unlock()
	if st.points == 0 && p.Lag() == 0 {
		return // nothing changed: nothing to say
	}
	s.log.Info("replication", "points", st.points, "bases", st.bases, "bytes", st.bytes, "lag", p.Lag().Round(time.Millisecond),
		"generation", st.generation, "stored_points", st.catalog.Points, "stored_bytes", st.catalog.StoredBytes(),
		"unshipped", p.Unshipped())
}

// retain is the retention job: points (continuous replication) and
// snapshots BACKUP_RETENTION no longer keeps, and pieces no point
// references.
func (s *Service) retain(ctx context.Context) error {
	st, _ := s.backend()
	if st == nil {
		return nil
	}
	r := Retention{Count: s.cfg.Retention, Age: s.cfg.RetentionAge}
	if s.incr == nil {
		_, err := pruneSnapshots(ctx, st, s.cfg.SessionID, r, s.clock.Now())
		return err
	}
	points, pieces, err := s.incr.Retain(ctx, st, r)
	if err != nil {
		s.noteErr(err)
		s.log.Warn("retention failed", "err", err)
		return err
	}
	if points > 0 || pieces > 0 {
		s.log.Info("retention", "deleted_points", points, "deleted_pieces", pieces, "keeps", r.String())
	}
	return nil
}

// replicationDetails fills the heartbeat's continuous-replication fields.
func (s *Service) replicationDetails(d *bus.BackupDetails) {
	p := s.incr
	if p == nil {
		return
	}
	d.Generation = s.lease.Generation()
	d.ReplicationLagMS = p.Lag().Milliseconds()
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	d.Points, d.StoredBytes = st.catalog.Points, st.catalog.StoredBytes()
	d.LastPointAt, d.LastBaseAt, d.LastCompactionAt = st.lastPoint, st.lastBase, st.lastCompaction
}
