package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"log/slog"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/proto/waE2E"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// t0 is the fake clock's start: a fixed instant keeps expected times exact.
var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// fakeConn stands in for the whatsmeow client; tests drive the gateway by
// emitting real whatsmeow events through it.
type fakeConn struct {
	mu         sync.Mutex
	handler    func(any) bool
	connectErr error
	jid        types.JID
	pairCode   string
	pairErr    error
	sendErr    error
	connected  bool
	// gate, when set, holds every Connect until the test sends on it.
	gate chan struct{}

	connects, inConnect, maxInConnect int
	disconnects, resets, closes       int
	pairPhones                        []string
	sent                              []sentMsg
	sendStarted                       chan struct{}
	sendRelease                       chan struct{}
}

type sentMsg struct {
	To   types.JID
	Text string
}

var _ Conn = (*fakeConn)(nil)

func newFakeConn() *fakeConn { return &fakeConn{} }

func (f *fakeConn) OnEventWithSuccess(h func(any) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handler = h
}

// emit delivers evt as whatsmeow would: synchronously, on the caller's
// goroutine; the result is the handler's success (SynchronousAck: whether
// whatsmeow would acknowledge it).
func (f *fakeConn) emit(evt any) bool {
	f.mu.Lock()
	h := f.handler
	f.mu.Unlock()
	if h == nil {
		panic("fakeConn: no handler yet")
	}
	return h(evt)
}

func (f *fakeConn) Connect(context.Context) error {
	f.mu.Lock()
	f.connects++
	f.inConnect++
	f.maxInConnect = max(f.maxInConnect, f.inConnect)
	err := f.connectErr
	f.connected = err == nil
	gate := f.gate
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	f.mu.Lock()
	f.inConnect--
	f.mu.Unlock()
	return err
}

func (f *fakeConn) Disconnect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disconnects++
	f.connected = false
}

func (f *fakeConn) IsConnected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connected
}

func (f *fakeConn) JID() types.JID {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.jid
}

func (f *fakeConn) PairPhone(_ context.Context, phone string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pairPhones = append(f.pairPhones, phone)
	return f.pairCode, f.pairErr
}

func (f *fakeConn) SendText(ctx context.Context, to types.JID, text string) (Sent, error) {
	f.mu.Lock()
	started, release := f.sendStarted, f.sendRelease
	f.mu.Unlock()
	if started != nil {
		started <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
			return Sent{}, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sendErr != nil {
		return Sent{}, f.sendErr
	}
	f.sent = append(f.sent, sentMsg{To: to, Text: text})
	return Sent{ID: "3EB0" + strings.Repeat("A", len(f.sent)), Timestamp: t0.Add(time.Minute)}, nil
}

func (f *fakeConn) ResetDevice(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resets++
	f.jid = types.EmptyJID
	return nil
}

func (f *fakeConn) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closes++
	return nil
}

func (f *fakeConn) get(read func(f *fakeConn) int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return read(f)
}

func (f *fakeConn) sentMsgs() []sentMsg {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.sent)
}

// recorder collects everything published under the session prefix, on its
// own bus connection.
type recorder struct {
	mu     sync.Mutex
	msgs   []*nats.Msg
	cursor int // conn events before it have been consumed by next
}

func newRecorder(t testing.TB, nc *nats.Conn, subj bus.Subjects) *recorder {
	t.Helper()
	r := &recorder{}
	// Events only: a subscriber on a request subject (session.restore,
	// backup.request) would hide nats.ErrNoResponders from the gateway.
	for _, s := range []string{subj.ConnAll(), subj.HeartbeatAll(), subj.MsgIn()} {
		sub, err := nc.Subscribe(s, func(m *nats.Msg) {
			r.mu.Lock()
			r.msgs = append(r.msgs, m)
			r.mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

// connEvents are the P.conn.* events received so far.
func (r *recorder) connEvents() []bus.ConnEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []bus.ConnEvent
	for _, m := range r.msgs {
		if strings.Contains(m.Subject, ".conn.") {
			var e bus.ConnEvent
			if err := json.Unmarshal(m.Data, &e); err != nil {
				panic(err)
			}
			out = append(out, e)
		}
	}
	return out
}

// next waits for the next connection event after the cursor and checks its
// kind; it fails on any other kind in between, so a test states the exact
// sequence.
func (r *recorder) next(t testing.TB, kind string) bus.ConnEvent {
	t.Helper()
	var got bus.ConnEvent
	testwait.For(t, 5*time.Second, "conn."+kind, func() bool {
		evs := r.connEvents()
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.cursor >= len(evs) {
			return false
		}
		got = evs[r.cursor]
		r.cursor++
		return true
	})
	if got.Kind != kind {
		t.Fatalf("next conn event: got %q (%+v), want %q; all: %v", got.Kind, got, kind, kinds(r.connEvents()))
	}
	return got
}

// none asserts that no connection event follows the cursor.
func (r *recorder) none(t testing.TB) {
	t.Helper()
	evs := r.connEvents()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cursor < len(evs) {
		t.Fatalf("unexpected conn events: %v", kinds(evs[r.cursor:]))
	}
}

func kinds(evs []bus.ConnEvent) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Kind)
	}
	return out
}

// on returns the decoded payloads published on subject so far.
func on[T any](r *recorder, subject string) []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []T
	for _, m := range r.msgs {
		if m.Subject == subject {
			var v T
			if err := json.Unmarshal(m.Data, &v); err != nil {
				panic(err)
			}
			out = append(out, v)
		}
	}
	return out
}

// lastBeat is the newest gateway heartbeat with its details.
func (r *recorder) lastBeat(subj bus.Subjects) (bus.Heartbeat, bus.GatewayDetails, bool) {
	beats := on[bus.Heartbeat](r, subj.Heartbeat(bus.ServiceGateway))
	if len(beats) == 0 {
		return bus.Heartbeat{}, bus.GatewayDetails{}, false
	}
	hb := beats[len(beats)-1]
	var d bus.GatewayDetails
	_ = json.Unmarshal(hb.Details, &d)
	return hb, d, true
}

// harness is one running gateway with its fake connection, fake clock, bus
// and recorder.
type harness struct {
	t     testing.TB
	gw    *Gateway
	conn  *fakeConn
	clock *clockwork.FakeClock
	srv   *bus.Server
	nc    *nats.Conn // the test's own connection (responders, requests)
	rec   *recorder
	relay *testrelay.Relay // answers P.relay.store and publishes P.msg.in
	subj  bus.Subjects
	opens chan struct{}
	done  chan error
	stop  context.CancelFunc
	shown []string
	qrMu  sync.Mutex
	logs  testlog.Buffer // every log line, at info and above
}

type option func(*Config, *fakeConn)

// start builds and runs a gateway; cleanup stops it and checks Run's result.
func start(t testing.TB, opts ...option) *harness {
	t.Helper()
	return startWith(t, nil, opts...)
}

// startWith is start with deps adjusting the gateway's Deps (a version
// source, a log to read) before it is built.
func startWith(t testing.TB, deps func(*Deps), opts ...option) *harness {
	t.Helper()
	cfg := Config{
		Session:      "Test-Bot",
		Instance:     testUnit,
		OwnerNumber:  "15550001111",
		Prefix:       ".",
		ReconnectMin: time.Second,
		ReconnectMax: 10 * time.Second,
		SendRate:     rate.Inf, // tests of SEND_RATE set their own
	}
	h := &harness{t: t, conn: newFakeConn(), clock: clockwork.NewFakeClockAt(t0), opens: make(chan struct{}, 4)}
	for _, o := range opts {
		o(&cfg, h.conn)
	}
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h.srv = srv
	gwNC, err := srv.Connect("gateway", discard())
	if err != nil {
		t.Fatal(err)
	}
	h.nc, err = srv.Connect("test", discard())
	if err != nil {
		t.Fatal(err)
	}
	h.subj = bus.NewSubjects(cfg.Session)
	h.rec = newRecorder(t, h.nc, h.subj)
	h.relay = testrelay.Start(t, h.nc, cfg.Session)
	d := Deps{
		NC: gwNC,
		Open: func(context.Context) (Conn, error) {
			h.opens <- struct{}{}
			return h.conn, nil
		},
		Log:    slog.New(slog.NewMultiHandler(testLog(t).Handler(), h.logs.Logger().Handler())),
		Clock:  h.clock,
		Jitter: func() float64 { return 0.5 },
		ShowQR: func(code string) {
			h.qrMu.Lock()
			h.shown = append(h.shown, code)
			h.qrMu.Unlock()
		},
	}
	if deps != nil {
		deps(&d)
	}
	h.gw = New(cfg, d)
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- h.gw.Run(ctx) }()
	t.Cleanup(func() {
		h.shutdown()
		h.nc.Close()
		gwNC.Close()
		srv.Shutdown()
	})
	return h
}

// shutdown cancels Run and waits for it; safe to call twice.
func (h *harness) shutdown() {
	h.t.Helper()
	h.stop()
	select {
	case err, ok := <-h.done:
		if ok && err != nil {
			h.t.Errorf("Run: %v", err)
		}
		if ok {
			close(h.done)
		}
	case <-time.After(5 * time.Second):
		h.t.Fatal("Run did not return after cancel")
	}
}

// serveRestore answers P.session.restore with respond, as the backup service
// would, until the test ends.
func (h *harness) serveRestore(respond nats.MsgHandler) {
	h.t.Helper()
	sub, err := h.nc.Subscribe(h.subj.SessionRestoreFor(testUnit), respond)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := h.nc.Flush(); err != nil {
		h.t.Fatal(err)
	}
}

// advance moves the fake clock by d.
func (h *harness) advance(d time.Duration) { h.clock.Advance(d) }

// advanceUntil steps the fake clock by step until cond holds. A goroutine
// may read the clock just before a step and arm its timer just after it;
// stepping on covers that.
func (h *harness) advanceUntil(step time.Duration, what string, cond func() bool) {
	h.t.Helper()
	testwait.For(h.t, 10*time.Second, what, func() bool {
		if cond() {
			return true
		}
		h.advance(step)
		return false
	})
}

// connected brings the gateway to "connected" with a linked JID.
func (h *harness) connected() {
	h.t.Helper()
	h.conn.mu.Lock()
	h.conn.jid = types.NewJID("15559998888", types.DefaultUserServer)
	h.conn.mu.Unlock()
	h.rec.next(h.t, bus.ConnConnecting)
	h.conn.emit(&events.Connected{})
	h.rec.next(h.t, bus.ConnConnected)
}

// probe pushes a message through relay and waits for its msg.in: every
// message emitted before it has then been handled.
func (h *harness) probe() {
	h.t.Helper()
	id := "probe-" + time.Now().Format("150405.000000000")
	if !h.conn.emit(textMsg(id, "15557770000", "hello")) {
		h.t.Fatal("probe not acknowledged")
	}
	testwait.For(h.t, 5*time.Second, "probe msg.in", func() bool {
		for _, m := range on[bus.MsgIn](h.rec, h.subj.MsgIn()) {
			if m.ID == id {
				return true
			}
		}
		return false
	})
}

// request sends a P.gateway.send body, as relay does, and decodes the
// reply.
func (h *harness) request(body string) bus.MsgSendReply {
	h.t.Helper()
	msg, err := h.nc.Request(h.subj.GatewaySend(), []byte(body), 5*time.Second)
	if err != nil {
		h.t.Fatalf("gateway.send request: %v", err)
	}
	var r bus.MsgSendReply
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		h.t.Fatalf("decode reply %q: %v", msg.Data, err)
	}
	return r
}

// requestAsync sends a P.gateway.send body without waiting; the reply
// comes on the channel.
func (h *harness) requestAsync(body string) <-chan bus.MsgSendReply {
	h.t.Helper()
	out := make(chan bus.MsgSendReply, 1)
	go func() {
		msg, err := h.nc.Request(h.subj.GatewaySend(), []byte(body), 10*time.Second)
		var r bus.MsgSendReply
		if err != nil {
			r.Error = "test: request: " + err.Error()
		} else if err := json.Unmarshal(msg.Data, &r); err != nil {
			r.Error = "test: decode reply: " + err.Error()
		}
		out <- r
	}()
	return out
}

// reply waits for an answer from requestAsync.
func (h *harness) reply(ch <-chan bus.MsgSendReply) bus.MsgSendReply {
	h.t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatal("no gateway.send reply")
		return bus.MsgSendReply{}
	}
}

// stopping reports whether the gateway has begun shutting down.
func (h *harness) stopping() bool {
	h.gw.sendMu.Lock()
	defer h.gw.sendMu.Unlock()
	return h.gw.sendBase != nil && !h.gw.accepting
}

func textMsg(id, senderPhone, text string) *events.Message {
	sender := types.NewJID(senderPhone, types.DefaultUserServer)
	return &events.Message{
		Info: types.MessageInfo{
			MessageSource: types.MessageSource{Chat: sender, Sender: sender},
			ID:            id,
			PushName:      "Tester",
			Timestamp:     t0,
		},
		Message: textProto(text),
	}
}

var errDial = errors.New("failed to dial whatsapp web websocket: lookup web.whatsapp.com: no such host")

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func textProto(s string) *waE2E.Message { return &waE2E.Message{Conversation: proto.String(s)} }

func testLog(t testing.TB) *slog.Logger {
	if os.Getenv("GATEWAY_TEST_LOG") == "" {
		return discard()
	}
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testUnit is the harness gateway's instance (and so its unit).
const testUnit = "test-1"
