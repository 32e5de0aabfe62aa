package backup

import "github.com/blacksky-md/blacksky/shared/bus"

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
	if s.store == nil || !s.dbOK || !s.lease.Held() || !s.epoch.reply.OK {
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
	d := bus.BackupDetails{DatabaseOK: s.dbOK, LeaseHeld: s.lease.Held(), LastError: s.lastErr, LastErrorAt: s.lastErrAt}
	if s.store != nil {
		d.Database = s.store.Kind()
	} else {
		d.Database = s.cfg.DatabaseKind
	}
	if holder, watched, ok := s.lease.Watch(); ok {
		d.LeaseHolder, d.LeaseWatchMS = holder, watched.Milliseconds()
	}
	if s.lastSnap != nil {
		d.LastSnapshotID, d.LastSnapshotAt, d.LastSnapshotBytes = s.lastSnap.ID, s.lastSnapAt, s.lastSnap.Bytes
	}
	s.replicationDetails(&d)
	return s.state, d
}

// publishStandby tells this instance's gateway (and only it: the event
// carries our instance) that another instance holds the session.
func (s *Service) publishStandby(reason string) {
	ev := bus.ConnEvent{Kind: bus.ConnStandby, Reason: reason, Instance: s.unit}
	ev.Stamp(s.cfg.SessionID, s.clock.Now())
	_ = bus.Publish(s.opts.NC, s.subj.Conn(bus.ConnStandby), ev)
}

// lastDatabaseSnapshot is the id of the last snapshot known in the
// database, for the logs (0: none seen by this process).
func (s *Service) lastDatabaseSnapshot() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastDBSnapID
}

// leaseObserver is the Service as its LeaseKeeper's LeaseObserver: lease
// calls feed the heartbeat, and a renewal after an outage ships what the
// local fallback kept meanwhile.
type leaseObserver struct{ s *Service }

var _ LeaseObserver = leaseObserver{}

func (o leaseObserver) CallFailed(err error)            { o.s.noteErr(err) }
func (o leaseObserver) DatabaseAnswers(ok bool)         { o.s.noteDB(ok) }
func (o leaseObserver) Waiting(state string, dbOK bool) { o.s.setWaitingState(state, dbOK) }
func (o leaseObserver) Standby(reason string)           { o.s.publishStandby(reason) }
func (o leaseObserver) WatchChanged()                   { o.s.kickBeat() }
func (o leaseObserver) HasLocalState() bool             { return o.s.hasLocalState() }

func (o leaseObserver) DatabaseAnswering() bool {
	o.s.mu.Lock()
	defer o.s.mu.Unlock()
	return o.s.dbOK
}

// NeedsProbe: the database failed last time, or a point is local only.
func (o leaseObserver) NeedsProbe() bool {
	return !o.DatabaseAnswering() || o.s.pipe.Unshipped()
}

// Renewed ships the local-only point once the database answers again.
func (o leaseObserver) Renewed(back bool) {
	if back || o.s.pipe.Unshipped() {
		o.s.shipLocal()
	}
}
