package sandbox_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"golang.org/x/time/rate"

	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/shared/bus"
)

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// rig is the real gateway over the sandbox, on a fake clock and an
// in-process bus.
type rig struct {
	t      testing.TB
	dir    string
	clock  *clockwork.FakeClock
	srv    *sandbox.Server
	client atomic.Pointer[sandbox.Client]
	nc     *nats.Conn
	subj   bus.Subjects
	rec    *recorder
	relay  *testrelay.Relay // stores and publishes P.msg.in; forwards P.msg.send
	cancel context.CancelFunc
	done   chan error
	// wrap, when set, stands between the gateway and the client.
	wrap   func(*sandbox.Client) gateway.Conn
	cfg    gateway.Config
	stopFn func()
}

func logger(t testing.TB) *slog.Logger {
	if os.Getenv("SANDBOX_TEST_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func newRig(t testing.TB, dir string, opts ...func(*rig)) *rig {
	t.Helper()
	r := &rig{t: t, dir: dir, clock: clockwork.NewFakeClockAt(t0)}
	r.cfg = gateway.Config{
		Session: "Sandbox-Test", Instance: "test-1", ReconnectMin: time.Second, ReconnectMax: 10 * time.Second,
		SendRate: rate.Inf,
	}
	for _, o := range opts {
		o(r)
	}
	srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{
		Path: filepath.Join(dir, "sandbox.db"), Seed: "test-seed", Clock: r.clock, Log: logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	r.srv = srv
	nsrv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gwNC, err := nsrv.Connect("gateway", logger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.nc, err = nsrv.Connect("test", logger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.subj = bus.NewSubjects(r.cfg.Session)
	r.rec = newRecorder(t, r.nc, r.subj)
	r.relay = testrelay.Start(t, r.nc, r.cfg.Session, testrelay.ForwardSends())
	gw := gateway.New(r.cfg, gateway.Deps{
		NC: gwNC,
		Open: func(ctx context.Context) (gateway.Conn, error) {
			c, err := srv.Open(ctx, sandbox.Options{Path: filepath.Join(dir, "session.db"), Log: logger(t)})
			if err != nil {
				return nil, err
			}
			r.client.Store(c)
			if r.wrap != nil {
				return r.wrap(c), nil
			}
			return c, nil
		},
		Log:      logger(t),
		Clock:    r.clock,
		Jitter:   func() float64 { return 0.5 },
		Versions: srv.Versions(),
	})
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan error, 1)
	go func() { r.done <- gw.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-r.done:
				if err != nil {
					t.Errorf("gateway Run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("gateway did not stop")
			}
			r.nc.Close()
			gwNC.Close()
			nsrv.Shutdown()
			if err := srv.Close(); err != nil {
				t.Errorf("close server: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	r.stopFn = stop
	return r
}

// stop ends the gateway and closes the server file, as a process exit.
func (r *rig) stop() { r.stopFn() }

// linked pairs the gateway by Link and waits until it is connected.
func (r *rig) linked() string {
	r.t.Helper()
	r.rec.next(r.t, bus.ConnConnecting)
	r.rec.next(r.t, bus.ConnQR)
	jid, err := r.srv.Link(r.t.Context(), "")
	if err != nil {
		r.t.Fatalf("link: %v", err)
	}
	if e := r.rec.next(r.t, bus.ConnPaired); e.JID != jid.String() {
		r.t.Fatalf("paired as %q, linked %q", e.JID, jid)
	}
	r.rec.next(r.t, bus.ConnConnected)
	return jid.String()
}

func (r *rig) inject(in sandbox.Inject) []string {
	r.t.Helper()
	ids, err := r.srv.Inject(r.t.Context(), in)
	if err != nil {
		r.t.Fatalf("inject: %v", err)
	}
	return ids
}

func (r *rig) fault(f sandbox.Fault) {
	r.t.Helper()
	if err := r.srv.Fault(r.t.Context(), f); err != nil {
		r.t.Fatalf("fault %s: %v", f.Kind, err)
	}
}

// msgIn waits until every id is on msg.in and returns them by id.
func (r *rig) msgIn(ids ...string) map[string]bus.MsgIn {
	r.t.Helper()
	var got map[string]bus.MsgIn
	testwait.For(r.t, 10*time.Second, "msg.in of "+strings.Join(ids, ","), func() bool {
		got = map[string]bus.MsgIn{}
		for _, m := range r.rec.msgIns() {
			got[m.ID] = m
		}
		for _, id := range ids {
			if _, ok := got[id]; !ok {
				return false
			}
		}
		return true
	})
	return got
}

// advanceUntil steps the fake clock until cond holds.
func (r *rig) advanceUntil(step time.Duration, what string, cond func() bool) {
	r.t.Helper()
	testwait.For(r.t, 10*time.Second, what, func() bool {
		if cond() {
			return true
		}
		r.clock.Advance(step)
		return false
	})
}

// recorder keeps what the gateway published.
type recorder struct {
	mu     sync.Mutex
	conns  []bus.ConnEvent
	ins    []bus.MsgIn
	cursor int
}

func newRecorder(t testing.TB, nc *nats.Conn, subj bus.Subjects) *recorder {
	t.Helper()
	r := &recorder{}
	sub, err := nc.Subscribe(subj.ConnAll(), func(m *nats.Msg) {
		var e bus.ConnEvent
		if json.Unmarshal(m.Data, &e) == nil {
			r.mu.Lock()
			r.conns = append(r.conns, e)
			r.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	sub2, err := nc.Subscribe(subj.MsgIn(), func(m *nats.Msg) {
		var e bus.MsgIn
		if json.Unmarshal(m.Data, &e) == nil {
			r.mu.Lock()
			r.ins = append(r.ins, e)
			r.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe(); _ = sub2.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *recorder) msgIns() []bus.MsgIn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bus.MsgIn(nil), r.ins...)
}

// next waits for the next connection event and checks its kind.
func (r *recorder) next(t testing.TB, kind string) bus.ConnEvent {
	t.Helper()
	var got bus.ConnEvent
	testwait.For(t, 10*time.Second, "conn."+kind, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.cursor >= len(r.conns) {
			return false
		}
		got = r.conns[r.cursor]
		r.cursor++
		return true
	})
	if got.Kind != kind {
		r.mu.Lock()
		var all []string
		for _, e := range r.conns {
			all = append(all, e.Kind)
		}
		r.mu.Unlock()
		t.Fatalf("next conn event %q (%+v), want %q; all: %v", got.Kind, got, kind, all)
	}
	return got
}

// skipTo consumes events until one of kind.
func (r *recorder) skipTo(t *testing.T, kind string) bus.ConnEvent {
	t.Helper()
	var got bus.ConnEvent
	testwait.For(t, 10*time.Second, "conn."+kind, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for r.cursor < len(r.conns) {
			e := r.conns[r.cursor]
			r.cursor++
			if e.Kind == kind {
				got = e
				return true
			}
		}
		return false
	})
	return got
}

// ahead is how many events wait after the cursor.
func (r *recorder) ahead() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns) - r.cursor
}

// none checks that no connection event follows.
func (r *recorder) none(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cursor < len(r.conns) {
		t.Fatalf("unexpected conn event %+v", r.conns[r.cursor])
	}
}

// storeDB opens a session store read-only, next to the running client.
func storeDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func count(t *testing.T, db *sql.DB, q string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(q, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return n
}
