package bus

import (
	"context"
	"encoding/json"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

// Beat reports a service's state for one heartbeat.
// details is marshalled as JSON (a GatewayDetails, BackupDetails, ...).
type Beat func() (state string, details any)

// Heartbeater publishes P.heartbeat.<service> every HeartbeatInterval on an
// injected clock. Run owns its goroutine; it returns when ctx ends.
type Heartbeater struct {
	NC       *nats.Conn
	Subjects Subjects
	Session  string
	Service  string
	Instance string
	Clock    clockwork.Clock
	Interval time.Duration // zero: HeartbeatInterval
	Beat     Beat
	// Kick, when set, beats at once on every receive: a service whose state
	// changed need not wait for the next interval.
	Kick <-chan struct{}
}

// Run beats once at once, then on every tick until ctx ends.
func (h *Heartbeater) Run(ctx context.Context) error {
	clock := h.Clock
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	interval := h.Interval
	if interval == 0 {
		interval = HeartbeatInterval
	}
	started := clock.Now()
	t := clock.NewTicker(interval)
	defer t.Stop()
	for {
		state, details := h.Beat()
		hb := Heartbeat{Service: h.Service, Instance: h.Instance, State: state,
			UptimeS: int64(clock.Since(started) / time.Second)}
		if details != nil {
			hb.Details, _ = json.Marshal(details)
		}
		hb.Stamp(h.Session, clock.Now())
		_ = Publish(h.NC, h.Subjects.Heartbeat(h.Service), hb) // a lost beat is harmless; the next one follows
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		case <-h.Kick:
		}
	}
}
