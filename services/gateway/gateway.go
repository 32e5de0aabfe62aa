package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"golang.org/x/time/rate"
)

// Conn is what the gateway needs of a WhatsApp client. Events arrive through
// the handler given to OnEventWithSuccess as go.mau.fi/whatsmeow/types/events
// values.
type Conn interface {
	// OnEventWithSuccess sets the event handler; called once, before
	// Connect. It has whatsmeow's SynchronousAck semantics: a message or
	// receipt is acknowledged to WhatsApp only after the handler returned
	// true for it; false leaves it unacknowledged, so WhatsApp delivers it
	// again (after the next reconnect). The handler blocks at most
	// Config.RelayTimeout.
	OnEventWithSuccess(handler func(evt any) bool)
	// Connect opens the websocket; login or pairing follows as events.
	// Connecting while already connected is not an error.
	Connect(ctx context.Context) error
	// Disconnect closes the websocket; it emits no event.
	Disconnect()
	// IsConnected reports whether the websocket is open and logged in.
	IsConnected() bool
	// JID is the linked device's JID, empty before pairing.
	JID() types.JID
	// PairPhone asks for a pairing code for phone (digits); call it once a
	// QR event has shown the pre-login socket is up.
	PairPhone(ctx context.Context, phone string) (string, error)
	// SendText sends a plain text message.
	SendText(ctx context.Context, to types.JID, text string) (Sent, error)
	// ResetDevice forgets the local device after a logout, so the next
	// Connect pairs anew.
	ResetDevice(ctx context.Context) error
	// Close releases the session store; the Conn is unusable afterwards.
	Close() error
}

// Sent is the server's answer to a sent message.
type Sent struct {
	ID        string
	Timestamp time.Time
}

// Opener opens the session store and returns a Conn over it. The gateway
// calls it once, after the restore (if any) is done.
type Opener func(ctx context.Context) (Conn, error)

// Deps are the gateway's collaborators.
type Deps struct {
	NC     *nats.Conn
	Open   Opener
	Log    *slog.Logger
	Clock  clockwork.Clock // nil: real clock
	Jitter func() float64  // nil: math/rand; see backoff.Backoff
	// ShowQR, when set, renders each QR code for a human (the terminal).
	// cmd sets it only where no log drain can read it (see CONTRACT).
	ShowQR func(code string)
	// Versions fetches and applies WhatsApp's current web client version
	// after client_outdated; nil: client_outdated stops the retries at once.
	Versions VersionSource
}

// Gateway is the service. Run it once.
type Gateway struct {
	cfg      Config
	nc       *nats.Conn
	subj     bus.Subjects
	open     Opener
	log      *slog.Logger
	clock    clockwork.Clock
	backoff  backoff.Backoff
	showQR   func(string)
	versions VersionSource
	limiter  *rate.Limiter

	running  atomic.Bool
	events   *queue                     // connection events for the loop
	evMu     sync.RWMutex               // read-held by every event handler call in flight
	evClosed bool                       // under evMu: the store is closed, Run is ending
	results  chan func(context.Context) // async outcomes handed back to the loop
	work     chan func(context.Context) // owner replies and alerts, off the loop

	mu   sync.Mutex // guards st and conn
	st   status
	conn Conn

	sendMu    sync.Mutex // guards accepting and sendBase; sends is the in-flight gateway.send work
	accepting bool
	sendBase  context.Context // outlives Run's ctx by the shutdown grace
	sends     sync.WaitGroup
	sent      *sentKeys // outcomes of recent gateway.send keys (sentkeys.go)

	relay     relayStats    // hand-overs to relay that failed (relay.go)
	relayBack chan struct{} // relay is back: the loop may reconnect for redelivery (redeliver.go)

	bg sync.WaitGroup // pairing-code requests in flight

	// Loop-owned: touched only by the supervisor goroutine.
	lc                    Conn
	gen                   uint64 // connect attempts, to spot stale async answers
	retry, qrTimer, watch clockwork.Timer
	qrCodes               []string
	qrFirst               bool
	pairAsked             bool
	verTried              time.Time // last fetch of WhatsApp's web version
	verConnected          bool      // a connect succeeded since verTried
	verNote               string    // told to the owner once connected
	redeliveredAt         time.Time // last reconnect for redelivery
	redeliverTimer        clockwork.Timer
}

// status is what heartbeats, owner commands and msg.send read.
type status struct {
	state          string
	started        time.Time
	jid            string
	connectedSince time.Time
	offlineSince   time.Time
	reconnects     int64
	attempt        int
	lastDisconnect string
	qrCode         string
	qrExpires      time.Time
	pairCode       string
	lastSnapshot   *bus.BackupDone
}

// New builds a gateway; nothing runs until Run.
func New(cfg Config, d Deps) *Gateway {
	cfg = cfg.withDefaults()
	clock := d.Clock
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	log := d.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Gateway{
		cfg:       cfg,
		nc:        d.NC,
		subj:      bus.NewSubjects(cfg.Session),
		open:      d.Open,
		log:       log,
		clock:     clock,
		backoff:   backoff.Backoff{Min: cfg.ReconnectMin, Max: cfg.ReconnectMax, Jitter: d.Jitter},
		showQR:    d.ShowQR,
		versions:  d.Versions,
		limiter:   rate.NewLimiter(cfg.SendRate, 1),
		sent:      newSentKeys(clock, sentKeysMax, sentKeysFor),
		events:    newQueue(),
		results:   make(chan func(context.Context)),
		work:      make(chan func(context.Context), 16),
		relayBack: make(chan struct{}, 1),
		st:        status{state: bus.StateStarting},
	}
}

// ErrRunning is returned by a second concurrent Run.
var ErrRunning = errors.New("gateway: already running")

// Run serves until ctx ends, then closes the socket and the store, publishes
// conn.stopped and returns. It returns an error only when the session store
// cannot be opened.
func (g *Gateway) Run(ctx context.Context) error {
	if !g.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer g.running.Store(false)
	g.mu.Lock()
	g.st.started = g.clock.Now()
	g.mu.Unlock()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Sends do not end with ctx: one that reached WhatsApp gets the shutdown
	// grace to be answered truthfully, so its caller does not send it again.
	sendCtx, cancelSends := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelSends()
	var wg sync.WaitGroup

	// Relay owns P.msg.send (queue, SEND_RATE, idempotency); it asks the
	// gateway to put each send on the socket with P.gateway.send.
	sendSub, err := g.nc.Subscribe(g.subj.GatewaySend(), g.onSend)
	if err != nil {
		return fmt.Errorf("gateway: subscribe gateway.send: %w", err)
	}
	doneSub, err := g.nc.Subscribe(g.subj.BackupDone(), g.onBackupDone)
	if err != nil {
		_ = sendSub.Unsubscribe()
		return fmt.Errorf("gateway: subscribe backup.done: %w", err)
	}
	// Relay's heartbeat says when it is back (redeliver.go).
	beatSub, err := g.nc.Subscribe(g.subj.Heartbeat(bus.ServiceRelay), g.onRelayBeat)
	if err != nil {
		_ = sendSub.Unsubscribe()
		_ = doneSub.Unsubscribe()
		return fmt.Errorf("gateway: subscribe relay heartbeat: %w", err)
	}
	g.sendMu.Lock()
	g.accepting, g.sendBase = true, sendCtx
	g.sendMu.Unlock()

	hb := &bus.Heartbeater{
		NC: g.nc, Subjects: g.subj, Session: g.cfg.Session, Service: bus.ServiceGateway,
		Instance: g.cfg.Instance, Clock: g.clock, Interval: g.cfg.HeartbeatInterval, Beat: g.beat,
	}
	wg.Go(func() { _ = hb.Run(runCtx) })
	wg.Go(func() { g.worker(runCtx) })

	runErr := g.supervise(runCtx)

	// Refuse new sends ("shutting down", rather than no responders while
	// the subscription is still there: relay keeps the send queued either
	// way), and let the ones in flight finish within the grace period
	// before the socket and the store go away.
	g.sendMu.Lock()
	grace := g.clock.AfterFunc(min(g.cfg.SendTimeout, ShutdownSendGrace), cancelSends)
	g.accepting = false
	g.sendMu.Unlock()
	g.sends.Wait()
	grace.Stop()
	cancelSends()
	g.drain(sendSub)
	_ = doneSub.Unsubscribe()
	_ = beatSub.Unsubscribe()
	cancel()
	wg.Wait()
	g.closeConn()
	// Handler calls in flight have had relay's answer (or given up) once
	// they return: every message acknowledged to WhatsApp is stored by
	// relay before conn.stopped.
	g.evMu.Lock()
	g.evClosed = true
	g.evMu.Unlock()

	g.setState(bus.StateStopped, "")
	g.publish(bus.ConnEvent{Kind: bus.ConnStopped})
	g.finalBeat()
	// The bus connection may be closed right after Run returns: make sure
	// conn.stopped and the last state left this process.
	_ = g.nc.FlushTimeout(2 * time.Second)
	g.log.Info("gateway stopped")
	return runErr
}

func (g *Gateway) closeConn() {
	g.mu.Lock()
	conn := g.conn
	g.conn = nil
	g.mu.Unlock()
	if conn == nil {
		return
	}
	conn.Disconnect()
	if err := conn.Close(); err != nil {
		g.log.Warn("closing the session store", "err", err)
	}
}

// onEvent is the handler whatsmeow calls, synchronously on its own
// goroutines, before it acknowledges the event to WhatsApp (SynchronousAck).
// A message or receipt is handed to relay right here and acknowledged only
// once relay has stored it (relay.go); connection events go to the loop and
// never block.
func (g *Gateway) onEvent(evt any) bool {
	g.evMu.RLock()
	defer g.evMu.RUnlock()
	switch e := evt.(type) {
	case *events.Message:
		if g.evClosed {
			g.log.Warn("message delivered after the socket closed; handing it to relay late", "id", e.Info.ID)
		}
		return g.onMessage(e)
	case *events.Receipt:
		return g.onReceipt(e)
	}
	g.events.push(evt)
	return true
}

// beat is the heartbeat's view of the state.
func (g *Gateway) beat() (string, any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	d := bus.GatewayDetails{
		WAState:        g.st.state,
		JID:            g.st.jid,
		Reconnects:     g.st.reconnects,
		Attempt:        g.st.attempt,
		LastDisconnect: g.st.lastDisconnect,
		QRCode:         g.st.qrCode,
		PairCode:       g.st.pairCode,
	}
	g.relay.details(&d)
	if !g.st.connectedSince.IsZero() {
		t := g.st.connectedSince.UTC()
		d.ConnectedSince = &t
	}
	if !g.st.qrExpires.IsZero() {
		t := g.st.qrExpires.UTC()
		d.QRExpiresAt = &t
	}
	return g.st.state, d
}

// finalBeat publishes one last heartbeat saying "stopped", so /status shows
// it at once instead of waiting for the heartbeat to go stale.
func (g *Gateway) finalBeat() {
	state, details := g.beat()
	g.mu.Lock()
	up := g.clock.Since(g.st.started)
	g.mu.Unlock()
	hb := bus.Heartbeat{Service: bus.ServiceGateway, Instance: g.cfg.Instance, State: state, UptimeS: int64(up / time.Second)}
	hb.Details, _ = json.Marshal(details)
	hb.Stamp(g.cfg.Session, g.clock.Now())
	if err := bus.Publish(g.nc, g.subj.Heartbeat(bus.ServiceGateway), hb); err != nil {
		g.log.Warn("publish final heartbeat", "err", err)
	}
}

// State returns the current WhatsApp state (a bus.State* constant).
func (g *Gateway) State() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.st.state
}

// publish stamps and publishes a connection event, naming our instance: on
// a shared bus, only our own backup acts on our paired and stopped.
func (g *Gateway) publish(e bus.ConnEvent) {
	e.Stamp(g.cfg.Session, g.clock.Now())
	e.Instance = g.cfg.Unit
	if err := bus.Publish(g.nc, g.subj.Conn(e.Kind), e); err != nil {
		g.log.Warn("publish connection event", "kind", e.Kind, "err", err)
	}
}

// worker runs owner replies and alerts one at a time, so a slow send never
// holds up the state machine.
func (g *Gateway) worker(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-g.work:
			f(ctx)
		}
	}
}

// later queues f for the worker; when the worker is swamped the job is
// dropped rather than blocking the loop.
func (g *Gateway) later(what string, f func(context.Context)) {
	select {
	case g.work <- f:
	default:
		g.log.Warn("owner work queue full; dropped", "what", what)
	}
}

func (g *Gateway) onBackupDone(m *nats.Msg) {
	var d bus.BackupDone
	if err := jsonUnmarshal(m.Data, &d); err != nil {
		g.log.Debug("ignoring malformed backup.done", "err", err)
		return
	}
	g.mu.Lock()
	g.st.lastSnapshot = &d
	g.mu.Unlock()
}

// drainWait bounds how long a stopping gateway waits for the requests
// already routed to its gateway.send subscription.
const drainWait = 2 * time.Second

// drain ends the gateway.send subscription without dropping a request the
// server already handed to this connection: Unsubscribe would discard it
// unanswered, leaving relay waiting out its request timeout (2 minutes,
// longer than relay's own stop budget when both stop together). Drained,
// it is answered "shutting down" (accepting is false by now) and relay
// keeps the send queued.
func (g *Gateway) drain(sub *nats.Subscription) {
	closed := sub.StatusChanged(nats.SubscriptionClosed)
	if err := sub.Drain(); err != nil {
		_ = sub.Unsubscribe()
		return
	}
	t := g.clock.NewTimer(drainWait)
	defer t.Stop()
	select {
	case <-closed:
	case <-t.Chan():
		_ = sub.Unsubscribe()
	}
}
