package relay

import (
	"context"
	"time"
)

// pruneLoop deletes what MESSAGE_RETENTION no longer keeps, on relay's own
// clock (a River periodic job would have to be in every client's Schedule,
// see package jobs), until ctx ends. It also gives queued sends that lost
// their job a new one (requeueSends): at each tick, and when the database
// answers again after failing (Run does it once before relay is ready).
func (s *Service) pruneLoop(ctx context.Context, st Store) {
	t := s.clock.NewTicker(s.cfg.PruneEvery)
	defer t.Stop()
	for {
		s.prune(ctx, st)
		select {
		case <-ctx.Done():
			return
		case <-s.dbBack:
			s.requeueLost(ctx)
			continue
		case <-t.Chan():
		}
		s.requeueLost(ctx)
	}
}

func (s *Service) prune(ctx context.Context, st Store) {
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	n, err := st.Prune(pctx, s.cfg.Session, s.clock.Now().Add(-s.cfg.Retention))
	if err != nil {
		if ctx.Err() == nil {
			s.noteErr(err)
			s.log.Warn("prune failed; next try at the next tick", "err", err)
		}
		return
	}
	if n > 0 {
		s.log.Info("pruned", "rows", n, "retention", s.cfg.Retention.String())
	}
	if _, q := s.backend(); q != nil {
		dead, err := q.PruneDead(pctx, s.cfg.Session, s.clock.Now().Add(-s.cfg.Retention))
		if err != nil {
			if ctx.Err() == nil {
				s.noteErr(err)
				s.log.Warn("pruning dead deliveries failed; next try at the next tick", "err", err)
			}
			return
		}
		if dead > 0 {
			s.log.Info("pruned dead deliveries", "jobs", dead, "retention", s.cfg.Retention.String())
		}
	}
}
