package relay_test

import (
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testproxy"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// proxied makes relay reach its PostgreSQL database through a proxy the
// test can cut.
func proxied(t *testing.T, s *setup) *testproxy.Proxy {
	t.Helper()
	u, err := url.Parse(s.db.url)
	if err != nil {
		t.Fatal(err)
	}
	p := testproxy.Start(t, u.Host)
	u.Host = p.Addr()
	s.through = u.String()
	return p
}

// lastBeat waits for a relay heartbeat that satisfies ok.
func lastBeat(t *testing.T, beats *collector, what string, ok func(bus.Heartbeat, bus.RelayDetails) bool) bus.RelayDetails {
	t.Helper()
	var d bus.RelayDetails
	testwait.Every(t, 4*bus.HeartbeatInterval, 100*time.Millisecond, what, func() bool {
		all := beats.all()
		for i := len(all) - 1; i >= 0; i-- {
			var hb bus.Heartbeat
			var det bus.RelayDetails
			if json.Unmarshal(all[i].Data, &hb) != nil || json.Unmarshal(hb.Details, &det) != nil {
				continue
			}
			if ok(hb, det) {
				d = det
				return true
			}
		}
		return false
	})
	return d
}

// While the database is away the heartbeat keeps the last figures it gave
// (with database_ok false): the messages are still stored, and /status
// showing 0 would say they are gone.
func TestHeartbeatKeepsTheLastKnownFiguresWhileTheDatabaseIsDown(t *testing.T) {
	s := newSetup(t, "postgres")
	p := proxied(t, s)
	beats := collect(t, s.bus.nc, subj.Heartbeat(bus.ServiceRelay))
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	store(t, s.bus.nc, message("c", "B", "y"))
	lastBeat(t, beats, "a heartbeat with two messages", func(_ bus.Heartbeat, d bus.RelayDetails) bool {
		return d.DatabaseOK && d.LastSeq == 2
	})
	p.Down()
	d := lastBeat(t, beats, "a heartbeat saying the database is down", func(hb bus.Heartbeat, d bus.RelayDetails) bool {
		return !d.DatabaseOK && hb.State == bus.StateDegraded
	})
	if d.LastSeq != 2 || d.Stored != 2 || d.Database != "postgres" || d.LastError == "" {
		t.Fatalf("details while the database is down: %+v, want the last known figures (last_seq 2, stored 2)", d)
	}
	p.Up()
	lastBeat(t, beats, "a heartbeat with the database back", func(_ bus.Heartbeat, d bus.RelayDetails) bool {
		return d.DatabaseOK && d.LastSeq == 2
	})
	in.stop(t)
}

// River logs a failed fetch for each queue several times a second while
// the database is away: relay's log gets one line when it goes (saying
// repeats are held back) and one when it is back, counting them.
func TestDatabaseOutageIsLoggedOnceNotOnEveryRiverFetch(t *testing.T) {
	s := newSetup(t, "postgres")
	p := proxied(t, s)
	beats := collect(t, s.bus.nc, subj.Heartbeat(bus.ServiceRelay))
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	p.Down()
	// Two heartbeats after the outage began: River polled every 50 ms
	// of it, each of its queues.
	lastBeat(t, beats, "a heartbeat saying the database is down", func(_ bus.Heartbeat, d bus.RelayDetails) bool {
		return !d.DatabaseOK
	})
	n := beats.len()
	testwait.Every(t, 3*bus.HeartbeatInterval, 100*time.Millisecond, "the next heartbeat", func() bool { return beats.len() > n })
	down := in.logs.String()
	if got := strings.Count(down, "Error fetching jobs"); got > 1 {
		t.Fatalf("River's fetch error logged %d times during the outage, want at most once:\n%.3000s", got, down)
	}
	if !strings.Contains(down, "not logged until") {
		t.Fatalf("no line says the repeats are held back:\n%.3000s", down)
	}
	p.Up()
	testwait.Every(t, 4*bus.HeartbeatInterval, 100*time.Millisecond, "a line saying the database is back", func() bool {
		return strings.Contains(in.logs.String(), "relay: the database answers again")
	})
	in.stop(t)
}
