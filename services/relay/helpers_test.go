package relay_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/postgres"
	"github.com/blacksky-md/blacksky/services/relay/sqlite"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

const session = "BLACKSKY-MD"

var kinds = []string{"sqlite", "postgres"}

// database is one test's relay database, shared by every relay it starts.
type database struct {
	kind string
	url  string
	path string
}

func newDatabase(t testing.TB, kind string) database {
	t.Helper()
	if kind == "postgres" {
		return database{kind: kind, url: testdb.Postgres(t).URL}
	}
	return database{kind: kind, path: filepath.Join(t.TempDir(), "blacksky.db")}
}

func (d database) open(ctx context.Context) (relay.Store, error) {
	if d.kind == "postgres" {
		return postgres.Open(ctx, postgres.Options{URL: d.url, MaxConns: 10})
	}
	return sqlite.Open(ctx, d.path)
}

// busServer is an in-process embedded bus and a connection with every
// right, to watch and to play the gateway and bots.
type busServer struct {
	srv *bus.Server
	nc  *nats.Conn
}

func newBus(t testing.TB, opts bus.ServerOptions) *busServer {
	t.Helper()
	srv, err := bus.StartServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := srv.Connect("observer", logging.Discard())
	if err != nil {
		srv.Shutdown()
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close(); srv.Shutdown() })
	return &busServer{srv: srv, nc: nc}
}

// conn connects as role and closes at cleanup.
func (b *busServer) conn(t testing.TB, role bus.Role) *nats.Conn {
	t.Helper()
	nc, err := b.srv.ConnectAs(role, "test-"+string(role), logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// instance is one running relay.
type instance struct {
	svc    *relay.Service
	cancel context.CancelFunc
	done   chan error
	logs   *testlog.Buffer
	nc     *nats.Conn
}

type setup struct {
	db    database
	bus   *busServer
	cfg   relay.Config
	clock clockwork.Clock
	// open replaces the database's Open (a database that fails).
	open func(ctx context.Context) (relay.Store, error)
	// sendTimeout and sendMaxAttempts tune the send jobs (zero: relay's).
	sendTimeout     time.Duration
	sendMaxAttempts int
	// backoff between job attempts; zero: 10 ms.
	backoff time.Duration
	// through, when set, is the PostgreSQL URL relay opens (a proxy the
	// test cuts), with an outage filter as cmd wires it.
	through string
	// webhookLanes: zero is 4 here, -1 relay's default. Tests poll every
	// 50 ms, and sixteen lanes' producers polling that often double the
	// suite's time under -race; TestWebhookDeliveriesSpreadOverSixteen
	// Lanes keeps the default.
	webhookLanes int
	// pollInterval is River's fetch poll: zero is 50 ms (tests wait
	// less), -1 River's own second, as relay runs in production
	// (benchmarks).
	pollInterval time.Duration
}

func newSetup(t testing.TB, kind string) *setup {
	return &setup{db: newDatabase(t, kind), bus: newBus(t, bus.ServerOptions{Token: "bots-token-for-relay-tests"}),
		cfg: relay.Config{Session: session, SendRate: 1000}}
}

// start runs a relay until the test ends (or stop).
func (s *setup) start(t testing.TB) *instance {
	t.Helper()
	log, buf := testlog.New()
	nc := s.bus.conn(t, bus.RoleRelay)
	open := s.open
	if open == nil {
		open = s.db.open
	}
	var outage *dboutage.Outage
	if s.through != "" {
		outage = dboutage.New(log, "relay")
		open = func(ctx context.Context) (relay.Store, error) {
			return postgres.Open(ctx, postgres.Options{URL: s.through, MaxConns: 10, Tracer: outage})
		}
	}
	wait := s.backoff
	if wait == 0 {
		wait = 10 * time.Millisecond
	}
	lanes := s.webhookLanes
	switch lanes {
	case 0:
		lanes = 4
	case -1:
		lanes = 0
	}
	poll := s.pollInterval
	switch poll {
	case 0:
		poll = 50 * time.Millisecond
	case -1:
		poll = 0
	}
	svc, err := relay.New(relay.Options{Config: s.cfg, NC: nc, Log: log, Clock: s.clock, Instance: "relay-test", WebhookLanes: lanes,
		Open: open, Backoff: backoff.Backoff{Min: wait, Max: wait}, QueuePollInterval: poll,
		SendTimeout: s.sendTimeout, SendMaxAttempts: s.sendMaxAttempts, Outage: outage})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{svc: svc, cancel: cancel, done: make(chan error, 1), logs: buf, nc: nc}
	go func() { in.done <- svc.Run(ctx) }()
	t.Cleanup(func() { in.stop(t) })
	if s.open == nil {
		// Ready: River started and lost sends queued again (requests
		// are answered a little earlier, from the store's opening).
		select {
		case <-svc.Ready():
		case <-time.After(30 * time.Second):
			t.Fatal("relay not ready within 30 s")
		}
	}
	// Ready once replay answers ok (with a failing database: once it
	// answers at all, its subscriptions being up).
	testwait.Every(t, 30*time.Second, 10*time.Millisecond, "relay to be ready", func() bool {
		m, err := s.bus.nc.Request(bus.NewSubjects(session).MsgReplay(), []byte(`{"limit":1}`), time.Second)
		var rep bus.MsgReplayReply
		return err == nil && (s.open != nil || json.Unmarshal(m.Data, &rep) == nil && rep.OK)
	})
	return in
}

// stop stops the relay and waits for it (once).
func (in *instance) stop(t testing.TB) {
	t.Helper()
	if in.cancel == nil {
		return
	}
	in.cancel()
	in.cancel = nil
	select {
	case err := <-in.done:
		if err != nil {
			t.Errorf("relay stopped with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not stop")
	}
	in.nc.Close()
}

// request sends v to subject and decodes the answer into out.
func request(t testing.TB, nc *nats.Conn, subject string, v, out any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var data []byte
	switch b := v.(type) {
	case []byte:
		data = b
	default:
		data, _ = json.Marshal(v)
	}
	msg, err := nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	if err := json.Unmarshal(msg.Data, out); err != nil {
		t.Fatalf("reply of %s: %v (%s)", subject, err, msg.Data)
	}
}

// store asks relay to store one message, waiting until relay is ready.
func store(t testing.TB, nc *nats.Conn, m bus.MsgIn) bus.RelayStoreReply {
	t.Helper()
	var rep bus.RelayStoreReply
	testwait.Every(t, 30*time.Second, 20*time.Millisecond, "relay to store a message", func() bool {
		rep = bus.RelayStoreReply{}
		request(t, nc, bus.NewSubjects(session).RelayStore(), bus.RelayStoreRequest{Message: &m}, &rep)
		return rep.OK || rep.Error != "relay is not ready: the database is not open yet"
	})
	return rep
}

func message(chat, id, text string) bus.MsgIn {
	return bus.MsgIn{ID: id, Chat: chat, Sender: chat, PushName: "Ann", Type: "text", Text: text,
		Timestamp: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

// collector gathers what arrives on a subject.
type collector struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func collect(t testing.TB, nc *nats.Conn, subject string) *collector {
	t.Helper()
	c := &collector{}
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		c.mu.Lock()
		c.msgs = append(c.msgs, m)
		c.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return c
}

func (c *collector) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs)
}

func (c *collector) all() []*nats.Msg {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*nats.Msg(nil), c.msgs...)
}

// msgIns decodes every P.msg.in collected.
func (c *collector) msgIns(t testing.TB) []bus.MsgIn {
	t.Helper()
	var out []bus.MsgIn
	for _, m := range c.all() {
		var in bus.MsgIn
		if err := json.Unmarshal(m.Data, &in); err != nil {
			t.Fatal(err)
		}
		out = append(out, in)
	}
	return out
}
