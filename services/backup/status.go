package backup

import (
	"errors"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// noteDB records the outcome of a database call: health follows every
// call, not only the lease renewals.
func (s *Service) noteDB(ok bool) {
	s.mu.Lock()
	changed := s.dbOK != ok
	s.dbOK = ok
	s.mu.Unlock()
	s.setState()
	if changed {
		s.kickBeat()
	}
}

// setWaitingState sets the state while no epoch runs (waiting for the
// database, the lease or the restore), beating at once on a change.
func (s *Service) setWaitingState(state string, dbOK bool) {
	s.mu.Lock()
	changed := s.state != state || s.dbOK != dbOK
	s.state, s.dbOK = state, dbOK
	s.mu.Unlock()
	if changed {
		s.kickBeat()
	}
}

// kickBeat publishes a heartbeat now: health, and a holder watching for
// standbys, hear of a change at once.
func (s *Service) kickBeat() {
	select {
	case s.beatKick <- struct{}{}:
	default:
	}
}

func (s *Service) noteErr(err error) {
	now := s.clock.Now().UTC()
	s.mu.Lock()
	s.lastErr, s.lastErrAt = err.Error(), &now
	s.mu.Unlock()
}

// setState derives the heartbeat state, unless standby or stopping.
func (s *Service) setState() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == bus.StateStopping {
		return
	}
	if !s.epoch.done {
		return // starting or standby until restore is done
	}
	was := s.state
	if s.store == nil || !s.dbOK || !s.leaseHeldLocked() || !s.epoch.reply.OK {
		s.state = bus.StateDegraded
	} else {
		s.state = bus.StateOK
	}
	if s.state != was {
		select {
		case s.beatKick <- struct{}{}:
		default:
		}
	}
}

func (s *Service) beat() (string, any) { return s.Status() }

// Status is the state and details the next heartbeat reports.
func (s *Service) Status() (string, bus.BackupDetails) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := bus.BackupDetails{DatabaseOK: s.dbOK, LeaseHeld: s.leaseHeldLocked(), LastError: s.lastErr, LastErrorAt: s.lastErrAt}
	if s.store != nil {
		d.Database = s.store.Kind()
	} else if s.cfg.DatabaseURL != "" {
		d.Database = "postgres"
	} else {
		d.Database = "sqlite"
	}
	if !s.watchSince.IsZero() {
		d.LeaseHolder, d.LeaseWatchMS = s.watchHolder, s.watchSeen.Sub(s.watchSince).Milliseconds()
	}
	if s.lastSnap != nil {
		d.LastSnapshotID, d.LastSnapshotAt, d.LastSnapshotBytes = s.lastSnap.ID, s.lastSnapAt, s.lastSnap.Bytes
	}
	return s.state, d
}

// trackShipped keeps the read number of the newest snapshot that reached
// the local fallback and not the database, and forgets it once a snapshot
// read at or after it is in the database.
func (s *Service) trackShipped(n int64, o outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch o.Where {
	case bus.StoredLocal:
		if !errors.Is(o.Err, ErrLeaseLost) {
			s.unshippedRead = max(s.unshippedRead, n)
		}
	case bus.StoredDatabase:
		if n >= s.unshippedRead {
			s.unshippedRead = 0
		}
	}
}

func (s *Service) hasUnshipped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unshippedRead > 0
}

// lastDatabaseSnapshot is the id of the last snapshot known in the
// database, for the logs (0: none seen by this process).
func (s *Service) lastDatabaseSnapshot() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastDBSnapID
}
