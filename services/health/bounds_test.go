package health

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// A message stamped far in the future must not make health ignore the real
// gateway: its time orders it against later messages.
func TestEventsStampedInTheFutureAreRefused(t *testing.T) {
	t.Parallel()
	far := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name   string
		forged func(b *bundle, t *testing.T)
	}{
		{"heartbeat", func(b *bundle, t *testing.T) {
			hb := bus.Heartbeat{Service: bus.ServiceGateway, Instance: "web.1", State: bus.StateConnected}
			hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected})
			hb.Stamp(b.opts.Session, far)
			b.sendHeartbeat(t, hb)
		}},
		{"conn event", func(b *bundle, t *testing.T) {
			ev := bus.ConnEvent{Kind: bus.ConnConnected}
			ev.Stamp(b.opts.Session, far)
			b.send(t, b.subj.Conn(bus.ConnConnected), "conn", ev)
		}},
		{"heartbeat a minute ahead", func(b *bundle, t *testing.T) {
			hb := bus.Heartbeat{Service: bus.ServiceGateway, Instance: "web.1", State: bus.StateConnected}
			hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected})
			hb.Stamp(b.opts.Session, b.clock.Now().Add(time.Minute))
			b.sendHeartbeat(t, hb)
		}},
		{"gateway state name too long", func(b *bundle, t *testing.T) {
			b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{WAState: strings.Repeat("x", 2000)})
			if wa := b.svc.tracker.WhatsApp(); len(wa.State) > maxNameLen {
				t.Fatalf("kept a WhatsApp state of %d characters", len(wa.State))
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, nil)
			b.healthy(t)
			tc.forged(b, t)
			// The real gateway reports trouble with an honest time.
			b.beat(t, bus.ServiceGateway, "web.1", bus.StateReconnecting, bus.GatewayDetails{WAState: bus.StateReconnecting})
			code, body, _ := b.get(t, "/readyz", nil)
			if code != 503 || !strings.Contains(body, "whatsapp: reconnecting") {
				t.Fatalf("/readyz = %d %s; want 503 naming the real state", code, body)
			}
		})
	}
	// A backup event from the future would show on /status and hide every
	// real snapshot and error reported after it.
	for _, tc := range []struct {
		name   string
		forged func(b *bundle, t *testing.T)
	}{
		{"backup.done", func(b *bundle, t *testing.T) {
			ev := bus.BackupDone{SnapshotID: 999, Reason: "manual", Bytes: 1}
			ev.Stamp(b.opts.Session, far)
			b.send(t, b.subj.BackupDone(), "backup", ev)
		}},
		{"backup.failed", func(b *bundle, t *testing.T) {
			ev := bus.BackupFailed{Reason: "manual", Error: "forged failure"}
			ev.Stamp(b.opts.Session, b.clock.Now().Add(time.Minute))
			b.send(t, b.subj.BackupFailed(), "backup", ev)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, nil)
			b.healthy(t)
			tc.forged(b, t)
			if bk := b.svc.tracker.Backup(); bk.LastID == 999 || bk.LastErr != "" {
				t.Fatalf("a %s from the future was recorded: %+v", tc.name, bk)
			}
			// The real backup service reports a snapshot and an error.
			now := b.clock.Now().UTC()
			b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, bus.BackupDetails{Database: "postgres", DatabaseOK: true, LeaseHeld: true,
				LastSnapshotID: 7, LastSnapshotAt: &now, LastError: "disk full", LastErrorAt: &now})
			_, body, _ := b.get(t, "/status", bearer(testToken))
			doc := decode[StatusDoc](t, body)
			if doc.Backup.LastSnapshot == nil || doc.Backup.LastSnapshot.ID != 7 || doc.Backup.LastError != "disk full" {
				t.Fatalf("/status backup = %+v; want the real snapshot 7 and error", doc.Backup)
			}
		})
	}
	t.Run("a little skew is fine", func(t *testing.T) {
		t.Parallel()
		b := setup(t, nil)
		hb := bus.Heartbeat{Service: bus.ServiceGateway, Instance: "web.1", State: bus.StateConnected}
		hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected})
		hb.Stamp(b.opts.Session, b.clock.Now().Add(2*time.Second))
		b.send(t, b.subj.Heartbeat(bus.ServiceGateway), "heartbeat.gateway", hb)
		if wa := b.svc.tracker.WhatsApp(); wa.State != bus.StateConnected {
			t.Fatalf("state = %q after a beat 2 s ahead; want connected", wa.State)
		}
	})
}

// sendHeartbeat publishes hb and waits until the tracker has taken or
// refused it.
func (b *bundle) sendHeartbeat(t testing.TB, hb bus.Heartbeat) {
	t.Helper()
	tr := b.svc.tracker
	seen := func() int64 { return tr.handledCount("heartbeat") + tr.handledCount("heartbeat."+hb.Service) }
	before := seen()
	if err := bus.Publish(b.pub, b.subj.Heartbeat(hb.Service), hb); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the tracker to handle a heartbeat", func() bool { return seen() > before })
}

// flood feeds the tracker n heartbeats with random service and instance
// names and random sizes, every big one of them with bigBytes of text.
func flood(tr *Tracker, rng *rand.Rand, n, big, bigBytes int, at time.Time) {
	services := append([]string{}, knownServices...)
	for i := range n {
		svc := services[rng.IntN(len(services))]
		if rng.IntN(2) == 0 {
			svc = fmt.Sprintf("svc-%x", rng.Uint64())
		}
		hb := bus.Heartbeat{Service: svc, Instance: fmt.Sprintf("inst-%x", rng.Uint64()), State: "ok"}
		hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected, LastDisconnect: strings.Repeat("x", rng.IntN(200))})
		if i < big {
			hb.Instance = strings.Repeat("i", bigBytes/2)
			hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected, LastDisconnect: strings.Repeat("d", bigBytes/2)})
		}
		hb.Stamp("BLACKSKY-MD", at)
		data, _ := json.Marshal(hb)
		tr.HandleHeartbeat(data)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// Whatever arrives on the bus, health keeps a bounded amount of it and
// /status stays small: only our own services, a few instances each.
func TestHeartbeatFloodLeavesMemoryAndStatusBounded(t *testing.T) {
	b := setup(t, nil)
	b.healthy(t)
	rng := rand.New(rand.NewPCG(1, 2))
	before := heapInUse()
	flood(b.svc.tracker, rng, 3000, 20, 512<<10, b.clock.Now())
	grown := int64(heapInUse()) - int64(before)
	if grown > 2<<20 {
		t.Errorf("heap grew by %d bytes after the flood; want under 2 MB", grown)
	}
	for _, hdr := range []map[string]string{nil, bearer(testToken)} {
		code, body, _ := b.get(t, "/status", hdr)
		if code != 200 || len(body) > 4<<10 {
			t.Errorf("/status (%v) = %d, %d bytes; want 200 under 4 KB", hdr != nil, code, len(body))
		}
		doc := decode[StatusDoc](t, body)
		for name, sd := range doc.Services {
			if !strings.Contains(strings.Join(knownServices, ","), name) {
				t.Errorf("/status lists %q, not one of our services", name)
			}
			if sd.Instances > 8 {
				t.Errorf("%s: %d instances kept; want at most 8", name, sd.Instances)
			}
		}
	}
	// The real gateway is still heard.
	b.healthy(t)
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("/readyz after the flood and a real beat = %d %s", code, body)
	}
}

// Instances that stop beating are forgotten, whichever service beats next.
func TestSilentInstancesAreForgotten(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, nil)
	b.beat(t, bus.ServiceBackup, "web.2", bus.StateOK, nil)
	b.clock.Advance(forgetAfter + time.Second)
	b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{WAState: bus.StateConnected})
	if sv := b.svc.tracker.Service(bus.ServiceBackup); sv.Seen {
		t.Fatalf("backup instances silent for %s still kept: %+v", forgetAfter, sv)
	}
}

// BenchmarkHeartbeatFlood sends a flood of heartbeats with random names and
// sizes over the bus and reports what health holds afterwards:
// go test -run '^$' -bench HeartbeatFlood -benchtime 20000x ./services/health
func BenchmarkHeartbeatFlood(b *testing.B) {
	bu := setup(b, nil)
	rng := rand.New(rand.NewPCG(3, 4))
	before := heapInUse()
	b.ResetTimer()
	for i := range b.N {
		svc := knownServices[i%len(knownServices)]
		if i%2 == 0 {
			svc = fmt.Sprintf("svc-%x", rng.Uint64())
		}
		hb := bus.Heartbeat{Service: svc, Instance: fmt.Sprintf("inst-%x", rng.Uint64()), State: "ok"}
		if i%100 == 0 {
			hb.Details, _ = json.Marshal(bus.GatewayDetails{LastDisconnect: strings.Repeat("d", 900<<10)})
		}
		hb.Stamp("BLACKSKY-MD", bu.clock.Now())
		if err := bus.Publish(bu.pub, bu.subj.Heartbeat(svc), hb); err != nil {
			b.Fatal(err)
		}
	}
	if err := bu.pub.Flush(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	_, body, _ := bu.get(b, "/status", bearer(testToken))
	b.ReportMetric(float64(len(body)), "status-bytes")
	b.ReportMetric(float64(int64(heapInUse())-int64(before)), "heap-growth-bytes")
}
