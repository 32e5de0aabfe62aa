package relay

import (
	"context"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/jobs"
)

// River states of a delivery that is not made yet, and of a dead one.
var (
	pendingStates = map[string]bool{"available": true, "pending": true, "running": true, "retryable": true, "scheduled": true}
	deadStates    = map[string]bool{"discarded": true, "cancelled": true}
)

// beat is relay's heartbeat: state and RelayDetails, read from the
// database each time (a few indexed counts).
func (s *Service) beat() (string, any) {
	s.mu.Lock()
	st, state, js := s.store, s.state, s.js != nil
	d := bus.RelayDetails{DatabaseOK: s.dbOK, JetStream: js, Webhook: s.cfg.WebhookURL != "",
		LastError: s.lastErr, LastErrorAt: s.lastErrAt}
	s.mu.Unlock()
	if st == nil {
		return state, d
	}
	d.Database = st.Kind()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	stats, err := st.Stats(ctx, s.cfg.Session)
	s.dbResult(err)
	if err != nil {
		// The last figures the database gave stand until it answers
		// again: an outage does not empty the store, and /status
		// showing 0 would say it did.
		s.mu.Lock()
		k := s.known
		d.LastError, d.LastErrorAt = s.lastErr, s.lastErrAt // this failure's
		s.mu.Unlock()
		d.DatabaseOK = false
		d.LastSeq, d.Stored, d.QueuedSends, d.PendingDeliveries, d.DeadDeliveries = k.LastSeq, k.Stored, k.QueuedSends,
			k.PendingDeliveries, k.DeadDeliveries
		if k.oldestMS > 0 {
			d.OldestPendingMS = max(0, s.clock.Now().UnixMilli()-k.oldestMS)
		}
		if state == bus.StateOK {
			state = bus.StateDegraded
		}
		return state, d
	}
	d.DatabaseOK = true
	d.LastSeq, d.Stored, d.QueuedSends = stats.LastSeq, stats.Stored, stats.QueuedSends
	var oldest int64
	defer func() {
		s.mu.Lock()
		s.known = knownFigures{RelayDetails: d, oldestMS: oldest}
		s.mu.Unlock()
	}()
	for _, c := range stats.Jobs {
		if c.Kind == jobs.KindRelaySend {
			continue
		}
		switch {
		case pendingStates[c.State]:
			d.PendingDeliveries += c.Count
			if c.OldestMS > 0 && (oldest == 0 || c.OldestMS < oldest) {
				oldest = c.OldestMS
			}
		case deadStates[c.State]:
			d.DeadDeliveries += c.Count
		}
	}
	if oldest > 0 {
		d.OldestPendingMS = max(0, s.clock.Now().UnixMilli()-oldest)
	}
	return state, d
}

// knownFigures are the heartbeat's figures as the database last gave them,
// and the creation time (unix ms) of the oldest pending delivery then.
type knownFigures struct {
	bus.RelayDetails
	oldestMS int64
}
