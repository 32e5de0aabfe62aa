package backup

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// Database retries: no jitter, since one instance retries its own database
// (no herd to spread) and tests step the fake clock through exact delays.
var (
	openBackoff      = backoff.Backoff{Min: 500 * time.Millisecond, Max: 10 * time.Second}
	reconnectBackoff = backoff.Backoff{Min: time.Second, Max: 5 * time.Second}
	restoreBackoff   = backoff.Backoff{Min: time.Second, Max: 10 * time.Second}
)

// openStore connects and migrates, retrying with backoff; nil means
// degraded (database unreachable). It gives up after DBWait only when there
// is something local to run on (a session store or a fallback snapshot): on an
// empty disk, starting unlinked would show a QR code while the real session
// sits in the database, so it keeps waiting for the database instead.
func (s *Service) openStore(ctx context.Context) Store {
	deadline := s.clock.Now().Add(s.cfg.DBWait)
	for n := 1; ; n++ {
		delay := openBackoff.Step(n)
		st, err := s.connect(ctx)
		if err == nil {
			return st
		}
		s.noteErr(err)
		if ctx.Err() != nil {
			return nil
		}
		s.setWaitingState(bus.StateDegraded, false)
		if !s.clock.Now().Add(delay).Before(deadline) {
			if s.hasLocalState() {
				s.log.Warn("database unreachable; degraded: restore and snapshots use the local fallback", "err", err)
				return nil
			}
			s.log.Warn("database unreachable and nothing local to restore from; waiting for the database", "err", err, "retry_in", delay)
		} else {
			s.log.Warn("database unreachable; retrying", "err", err, "retry_in", delay)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.clock.After(delay):
		}
	}
}

// hasLocalState reports whether the disk holds a session store, a
// fallback snapshot or fallback points.
func (s *Service) hasLocalState() bool {
	if _, err := os.Stat(s.sessionPath); err == nil {
		return true
	}
	files, _ := s.local.List()
	points, _ := s.localPoints().List()
	return len(files) > 0 || len(points) > 0
}

func (s *Service) connect(ctx context.Context) (Store, error) {
	// Real time, unlike the other calls' timeouts: opening runs migrations
	// (hundreds of ms of real I/O), and a test's fake clock, advanced while
	// it waits for something else, would cut them short. ctx is Run's, so a
	// shutdown still cancels it.
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	st, err := s.opts.Open(cctx)
	if err != nil {
		return nil, err
	}
	if err := st.Migrate(cctx); err != nil {
		st.Close()
		return nil, fmt.Errorf("migrate: %w", err)
	}
	return st, nil
}

// fallbackTicker takes a local-fallback snapshot every BACKUP_INTERVAL while
// the database is down: River's scheduled job cannot run then (guarantee 4).
func (s *Service) fallbackTicker(ctx context.Context) {
	if s.cfg.Interval <= 0 {
		return
	}
	t := s.clock.NewTicker(s.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.Chan():
		}
		s.mu.Lock()
		down := s.store == nil || s.queue == nil || !s.dbOK
		s.mu.Unlock()
		if down {
			s.log.Info("database down: scheduled snapshot to the local fallback")
			s.spawn(func() { s.direct(bus.ReasonScheduled) })
		}
	}
}

func (s *Service) startQueue(st Store) error {
	q, err := st.NewQueue(QueueConfig{
		Work:     s.work,
		Retain:   s.retain,
		Schedule: s.cfg.Schedule(),
		Instance: s.jobKey,
		// One line when the database goes, one when it is back, not
		// River's failed fetch of every queue several times a second.
		Logger:       s.opts.Outage.Wrap(s.log),
		PollInterval: s.cfg.QueuePollInterval,
	})
	if err != nil {
		return err
	}
	if err := q.Start(context.WithoutCancel(context.Background())); err != nil {
		return err
	}
	s.setDB(st, q, true)
	return nil
}

func (s *Service) setDB(st Store, q Queue, ok bool) {
	s.mu.Lock()
	s.store, s.queue, s.dbOK = st, q, ok
	s.mu.Unlock()
	// Jobs of a previous queue will never run here: forget them.
	s.pipe.Requeue()
	s.setState()
}

func (s *Service) backend() (Store, Queue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store, s.queue
}

// reconnect runs while degraded: once the database answers, it takes the
// lease, starts River and stores a fresh snapshot there (guarantee 4). If
// another instance holds the lease by then, the epoch ends (standby).
func (s *Service) reconnect(ctx context.Context) {
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-s.clock.After(reconnectBackoff.Step(n)):
		}
		st, err := s.connect(ctx)
		if err != nil {
			s.noteErr(err)
			continue
		}
		lease, ok, err := s.lease.TakeOnce(ctx, st)
		if err != nil {
			s.noteErr(fmt.Errorf("take lease: %w", err))
			st.Close()
			continue
		}
		if !ok {
			if lease.Holder == "" {
				st.Close()
				continue
			}
			s.mu.Lock()
			s.store, s.dbOK = st, true
			s.mu.Unlock()
			s.lease.Lose(lease.Holder, "")
			return
		}
		if err := s.startQueue(st); err != nil {
			s.noteErr(err)
			s.lease.Release(ctx, st)
			st.Close()
			continue
		}
		s.log.Info("database back: snapshots go to it again")
		s.shipLocal()
		s.lease.Start(ctx, st)
		return
	}
}
