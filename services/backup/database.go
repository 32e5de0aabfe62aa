package backup

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// openStore connects and migrates, retrying with backoff; nil means
// degraded (database unreachable). It gives up after DBWait only when there
// is something local to run on (a session store or a fallback snapshot): on an
// empty disk, starting unlinked would show a QR code while the real session
// sits in the database, so it keeps waiting for the database instead.
func (s *Service) openStore(ctx context.Context) Store {
	deadline := s.clock.Now().Add(s.opts.DBWait)
	delay := 500 * time.Millisecond
	for {
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
		delay = min(delay*2, 10*time.Second)
	}
}

// hasLocalState reports whether the disk holds a session store or a
// fallback snapshot.
func (s *Service) hasLocalState() bool {
	if _, err := os.Stat(s.sessionPath); err == nil {
		return true
	}
	files, _ := s.local.List()
	return len(files) > 0
}

func (s *Service) connect(ctx context.Context) (Store, error) {
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
	if s.cfg.BackupInterval <= 0 {
		return
	}
	t := s.clock.NewTicker(s.cfg.BackupInterval)
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
		Work:         s.work,
		Interval:     s.cfg.BackupInterval,
		Instance:     s.jobKey,
		Logger:       s.log,
		PollInterval: s.opts.QueuePollInterval,
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
	s.co.mu.Lock()
	clear(s.co.queued)
	s.co.mu.Unlock()
	s.setState()
}

func (s *Service) backend() (Store, Queue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store, s.queue
}
