package health

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

const testToken = "test-health-token-0123456789abcdef"

// bundle is a running health service on an in-process NATS, and what a test
// needs to drive it.
type bundle struct {
	svc   *Service
	pub   *nats.Conn
	clock *clockwork.FakeClock
	subj  bus.Subjects
	url   string
	opts  Options
	seq   int64
}

// setup starts the service on 127.0.0.1:0 with a fake clock and waits until
// its own first heartbeat has come back over the bus.
func setup(t testing.TB, mod func(*Options)) *bundle {
	t.Helper()
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	log := logging.Discard()
	nc, err := srv.Connect("health", log)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := srv.Connect("test", log)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	opts := Options{
		NC: nc, Listener: ln, Session: "BLACKSKY-MD", Instance: "web.1", Version: "v-test",
		Clock: clock, Log: log, Token: testToken, HealthCheck: true, BackupEnabled: true,
	}
	if mod != nil {
		mod(&opts)
	}
	svc, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		nc.Close()
		pub.Close()
	})
	b := &bundle{svc: svc, pub: pub, clock: clock, subj: bus.NewSubjects(opts.Session),
		url: "http://" + ln.Addr().String(), opts: opts}
	testwait.For(t, 5*time.Second, "health's own heartbeat", func() bool {
		return svc.tracker.Service(bus.ServiceHealth).Seen
	})
	return b
}

// send publishes v on subject and waits until the tracker has handled it.
func (b *bundle) send(t testing.TB, subject, kind string, v any) {
	t.Helper()
	before := b.svc.tracker.handledCount(kind)
	if err := bus.Publish(b.pub, subject, v); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the tracker to handle "+subject, func() bool {
		return b.svc.tracker.handledCount(kind) > before
	})
}

// beat publishes one heartbeat of service/instance.
func (b *bundle) beat(t testing.TB, service, instance, state string, details any) {
	t.Helper()
	b.seq++
	hb := bus.Heartbeat{Service: service, Instance: instance, State: state, UptimeS: b.seq}
	if details != nil {
		hb.Details, _ = json.Marshal(details)
	}
	hb.Stamp(b.opts.Session, b.clock.Now())
	b.send(t, b.subj.Heartbeat(service), "heartbeat."+service, hb)
}

// conn publishes a P.conn.<kind> event.
func (b *bundle) conn(t testing.TB, ev bus.ConnEvent) {
	t.Helper()
	ev.Stamp(b.opts.Session, b.clock.Now())
	b.send(t, b.subj.Conn(ev.Kind), "conn", ev)
}

// event is the common part of an event sent now.
func (b *bundle) event() bus.Event {
	var e bus.Event
	e.Stamp(b.opts.Session, b.clock.Now())
	return e
}

// healthy makes gateway (connected, with a JID), backup and relay beat.
func (b *bundle) healthy(t testing.TB) {
	t.Helper()
	since := b.clock.Now().Add(-time.Hour).UTC()
	b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{
		WAState: bus.StateConnected, JID: "15551234567:12@s.whatsapp.net", ConnectedSince: &since, Reconnects: 3,
		LastDisconnect: "keepalive timeout"})
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateOK, bus.BackupDetails{Database: "postgres", DatabaseOK: true, LeaseHeld: true})
	b.relayBeat(t, relayOK())
}

// relayOK are the details of a relay with nothing wrong.
func relayOK() bus.RelayDetails {
	return bus.RelayDetails{Database: "postgres", DatabaseOK: true, LastSeq: 42, Stored: 40}
}

// relayBeat publishes one relay heartbeat.
func (b *bundle) relayBeat(t testing.TB, d bus.RelayDetails) {
	t.Helper()
	b.beat(t, bus.ServiceRelay, "web.1", bus.StateOK, d)
}

// advance moves the fake clock and waits for the health heartbeat its ticker
// sends, so the next message a test sends is not mistaken for it.
func (b *bundle) advance(t testing.TB, d time.Duration) {
	t.Helper()
	before := b.svc.tracker.handledCount("heartbeat.health")
	b.clock.Advance(d)
	testwait.For(t, 5*time.Second, "health's heartbeat after the clock moved", func() bool {
		return b.svc.tracker.handledCount("heartbeat.health") > before
	})
}

// get fetches path with optional headers; it returns status, body and response.
func (b *bundle) get(t testing.TB, path string, hdr map[string]string) (int, string, *http.Response) {
	t.Helper()
	return do(t, http.MethodGet, b.url+path, nil, hdr)
}

func do(t testing.TB, method, url string, body io.Reader, hdr map[string]string) (int, string, *http.Response) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(data), resp
}

func bearer(tok string) map[string]string { return map[string]string{"Authorization": "Bearer " + tok} }

func decode[T any](t testing.TB, body string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("decode %q: %v", body, err)
	}
	return v
}

func hasReason(reasons []string, prefix string) bool {
	for _, r := range reasons {
		if strings.HasPrefix(r, prefix) {
			return true
		}
	}
	return false
}
