package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"
)

// Options configure a Service.
type Options struct {
	Config Config
	NC     *nats.Conn
	Log    *slog.Logger
	Clock  clockwork.Clock
	// Instance names this process in heartbeats.
	Instance string
	// Open connects to the database; the service migrates it and retries
	// Open with backoff while it fails.
	Open func(ctx context.Context) (Store, error)
	// Schedule is the product's periodic jobs (package jobs).
	Schedule jobs.Schedule
	// Lanes, WebhookLanes, Backoff and QueuePollInterval tune River
	// (tests); zero: defaults.
	Lanes             int
	WebhookLanes      int
	Backoff           backoff.Backoff
	QueuePollInterval time.Duration
	// SendTimeout and SendMaxAttempts bound a send job's attempts
	// (tests); zero: DefaultSendTimeout, DefaultSendMaxAttempts.
	SendTimeout     time.Duration
	SendMaxAttempts int
	// Outage collapses the log of a database outage (River logs each
	// failed poll); give the same one to the store's pool as its tracer
	// (postgres.Options.Tracer) so it hears of the outage first. Nil: one
	// that only hears what relay's own queries say.
	Outage *dboutage.Outage
	// HTTPClient posts to the webhook (a copy that follows no redirect);
	// nil: one with Config.WebhookTimeout.
	HTTPClient *http.Client
}

// Service is relay: a runner for the role supervisor.
type Service struct {
	opts    Options
	cfg     Config
	log     *slog.Logger
	clock   clockwork.Clock
	subj    bus.Subjects
	codec   Codec
	http    *http.Client
	limiter *rate.Limiter
	outage  *dboutage.Outage

	handlers sync.WaitGroup
	hmu      sync.Mutex    // guards closed, so handlers.Add never races handlers.Wait
	closed   bool          // stop began: requests are refused, not run
	sem      chan struct{} // bounds concurrent request handlers
	stopping chan struct{} // closed when Run stops: waiting sends answer at once
	// stopCtx ends with stopping: long requests (deliveries retry) give
	// up rather than hold the stop, which waits for every handler.
	stopCtx  context.Context
	stopDone context.CancelFunc
	dbBack   chan struct{} // signalled when the database answers again after failing
	ready    chan struct{} // closed once relay serves with its database, or Run returned
	readyOne sync.Once
	waiters  waiters
	cutMu    sync.Mutex
	cuts     []Cut // jobs the stop interrupted, put back in place after it

	mu        sync.Mutex
	store     Store
	queue     Queue
	js        jetstream.JetStream // nil: no JetStream, core NATS only
	jsKnown   bool                // whether the server's answer about JetStream is known
	jsTried   time.Time           // the last time relay asked, while unknown
	state     string
	dbOK      bool
	lastErr   string
	lastErrAt *time.Time
	startedAt time.Time
	known     knownFigures // the heartbeat's last figures from the database
}

var _ interface{ Run(context.Context) error } = (*Service)(nil)

// queueGroup makes each request and event go to one relay when several run
// (a preboot overlap): two would store, deliver and send everything twice.
const queueGroup = "blacksky-relay"

// maxHandlers bounds the requests handled at once; beyond it the bus
// subscription's own goroutine handles them one by one (back pressure).
const maxHandlers = 64

// New checks the options and builds the service; Run starts it.
func New(opts Options) (*Service, error) {
	if opts.NC == nil || opts.Open == nil {
		return nil, errors.New("relay: NC and Open are required")
	}
	if opts.Config.Session == "" {
		return nil, errors.New("relay: Config.Session is required")
	}
	if err := CheckWebhookEvents(opts.Config.WebhookEvents); err != nil {
		return nil, fmt.Errorf("relay: WEBHOOK_EVENTS: %w", err)
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Instance == "" {
		opts.Instance = "relay"
	}
	cfg := opts.Config.withDefaults()
	if cfg.WebhookURL != "" && cfg.WebhookRetryFor > cfg.Retention {
		// A delivery retried longer would find its message deleted.
		opts.Log.Warn("WEBHOOK_RETRY_FOR is longer than MESSAGE_RETENTION: webhook deliveries are retried for MESSAGE_RETENTION at most",
			"webhook_retry_for", cfg.WebhookRetryFor.String(), "message_retention", cfg.Retention.String())
		cfg.WebhookRetryFor = cfg.Retention
	}
	if opts.Outage == nil {
		opts.Outage = dboutage.New(opts.Log.With("service", bus.ServiceRelay), "relay")
	}
	hc := &http.Client{Timeout: cfg.WebhookTimeout}
	if opts.HTTPClient != nil {
		c := *opts.HTTPClient
		hc = &c
	}
	// A redirect is never followed: Go would turn a 301, 302 or 303 into a
	// GET without the body, whose 2xx would count as delivered. post makes
	// the 3xx itself dead, saying so.
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	stopCtx, stopDone := context.WithCancel(context.Background())
	return &Service{
		opts:     opts,
		cfg:      cfg,
		log:      opts.Log.With("service", bus.ServiceRelay),
		clock:    opts.Clock,
		subj:     bus.NewSubjects(cfg.Session),
		codec:    Codec{Key: cfg.Key},
		http:     hc,
		limiter:  rate.NewLimiter(cfg.SendRate, 1),
		outage:   opts.Outage,
		sem:      make(chan struct{}, maxHandlers),
		stopping: make(chan struct{}),
		stopCtx:  stopCtx,
		stopDone: stopDone,
		dbBack:   make(chan struct{}, 1),
		ready:    make(chan struct{}),
		waiters:  waiters{m: map[string][]*waiter{}},
		state:    bus.StateStarting,
	}, nil
}

// Run serves relay's subjects, opens the database, starts River and prunes
// until ctx ends; then it stops taking requests, lets running jobs finish
// and closes the database. It returns nil after a graceful stop.
func (s *Service) Run(ctx context.Context) error {
	s.startedAt = s.clock.Now()
	defer s.markReady()
	hbCtx, hbStop := context.WithCancel(context.WithoutCancel(ctx))
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		hb := &bus.Heartbeater{NC: s.opts.NC, Subjects: s.subj, Session: s.cfg.Session, Service: bus.ServiceRelay,
			Instance: s.opts.Instance, Clock: s.clock, Beat: s.beat}
		_ = hb.Run(hbCtx)
	}()
	defer func() { hbStop(); <-hbDone }()

	var subs []*nats.Subscription
	defer func() {
		for _, sub := range subs {
			_ = sub.Unsubscribe()
		}
	}()
	refuse := func(v any) func(*nats.Msg) { return func(m *nats.Msg) { s.respond(m, v) } }
	stopping := errStopping.Error()
	for subject, h := range map[string][2]func(*nats.Msg){
		s.subj.RelayStore(): {s.onStore, refuse(bus.RelayStoreReply{Error: stopping})},
		s.subj.MsgSend():    {s.onSend, refuse(bus.MsgSendReply{Error: stopping + "; nothing was queued"})},
		s.subj.MsgReplay():  {s.onReplay, refuse(bus.MsgReplayReply{Messages: []bus.MsgIn{}, Error: stopping})},
		s.subj.RelayRetry(): {s.onRetry, refuse(bus.RelayRetryReply{Error: stopping})},
		s.subj.ConnAll():    {s.onConn, func(*nats.Msg) {}},
	} {
		sub, err := s.opts.NC.QueueSubscribe(subject, queueGroup, s.spawn(h[0], h[1]))
		if err != nil {
			return fmt.Errorf("relay: subscribe %s: %w", subject, err)
		}
		subs = append(subs, sub)
	}
	if err := s.opts.NC.Flush(); err != nil {
		s.log.Warn("bus not reachable yet; relay answers once it is", "err", err)
	}

	s.setupJetStream(ctx)
	st, err := s.startBackend(ctx)
	if err != nil {
		_ = s.stop(subs)
		return err
	}
	if st == nil {
		return s.stop(subs)
	}
	s.mu.Lock()
	s.state = bus.StateOK
	jsOn := s.js != nil
	s.mu.Unlock()
	s.log.Info("relay ready", "database", st.Kind(), "jetstream", jsOn,
		"webhook", webhookShown(s.cfg.WebhookURL), "retention", s.cfg.Retention.String())
	// Sends a crash left without a job are queued again before relay
	// says it is ready (blacksky run starts the gateway then).
	s.requeueLost(ctx)
	s.markReady()

	s.pruneLoop(ctx, st)
	return s.stop(subs)
}

// startBackend opens the database and starts River on it, both retried
// while the database fails (River's start queries it too); it returns nil
// once ctx ends, and an error only for a queue that cannot be built.
func (s *Service) startBackend(ctx context.Context) (Store, error) {
	for attempt := 1; ; attempt++ {
		st := s.openStore(ctx)
		if st == nil {
			return nil, nil
		}
		q, err := st.NewQueue(QueueConfig{
			Deliver:         s.deliverJob,
			Send:            s.sendJob,
			Lanes:           s.opts.Lanes,
			WebhookLanes:    s.opts.WebhookLanes,
			Backoff:         s.opts.Backoff,
			Schedule:        s.opts.Schedule,
			PollInterval:    s.opts.QueuePollInterval,
			SendTimeout:     s.opts.SendTimeout,
			SendMaxAttempts: s.opts.SendMaxAttempts,
			StopGrace:       s.cfg.StopGrace,
			// River logs every failed fetch (each queue, several a
			// second) while the database is away: one line when it
			// goes, one when it is back.
			Logger: s.outage.Wrap(s.log),
		})
		if err != nil {
			st.Close()
			return nil, fmt.Errorf("relay: %w", err)
		}
		// Store and queue appear together, before River starts: a
		// request either finds both or hears that relay is not ready,
		// and the first jobs River hands out find them (not "not
		// ready", a failed attempt that would also put the job behind
		// its chat's later ones). Jobs inserted before Start wait in
		// the database.
		s.mu.Lock()
		s.store, s.queue, s.dbOK = st, q, true
		s.mu.Unlock()
		err = q.Start(context.WithoutCancel(ctx))
		if err == nil {
			return st, nil
		}
		s.mu.Lock()
		s.store, s.queue = nil, nil
		s.mu.Unlock()
		st.Close()
		s.dbResult(err)
		delay := dbRetry.Step(attempt)
		s.log.Warn("cannot start the job queue; retrying", "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return nil, nil
		case <-s.clock.After(delay):
		}
	}
}

// dbRetry paces relay's retries of its database: 500 ms doubling to 10 s,
// without jitter (relay retries its own database, and tests step the
// clock).
var dbRetry = backoff.Backoff{Min: 500 * time.Millisecond, Max: 10 * time.Second}

// Ready is closed once relay serves with its database open (it stores what
// the gateway hands it), or once Run has returned: blacksky run starts the
// gateway after it, so the gateway's first messages find relay there.
func (s *Service) Ready() <-chan struct{} { return s.ready }

func (s *Service) markReady() { s.readyOne.Do(func() { close(s.ready) }) }

// errStopping answers requests that arrive while relay stops.
var errStopping = errors.New("relay is stopping; ask again once it is back")

// spawn runs h on its own goroutine while fewer than maxHandlers run, so
// one slow request (a send that waits) does not hold up the others; beyond
// that, on the subscription's goroutine. Either way stop waits for it. Once
// stop began, refuse answers instead (the store is being closed).
func (s *Service) spawn(h, refuse func(*nats.Msg)) nats.MsgHandler {
	return func(m *nats.Msg) {
		s.hmu.Lock()
		if s.closed {
			s.hmu.Unlock()
			refuse(m)
			return
		}
		s.handlers.Add(1)
		s.hmu.Unlock()
		select {
		case s.sem <- struct{}{}:
			go func() {
				defer s.handlers.Done()
				defer func() { <-s.sem }()
				h(m)
			}()
		default:
			defer s.handlers.Done()
			h(m)
		}
	}
}

// openStore connects and migrates, retrying with backoff until ctx ends
// (nil then). Meanwhile requests are refused with the reason, so the
// gateway does not acknowledge messages relay could not keep.
func (s *Service) openStore(ctx context.Context) Store {
	for attempt := 1; ; attempt++ {
		st, err := s.connect(ctx)
		if err == nil {
			return st
		}
		s.noteErr(err)
		if ctx.Err() != nil {
			return nil
		}
		delay := dbRetry.Step(attempt)
		s.log.Warn("database unreachable; retrying", "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return nil
		case <-s.clock.After(delay):
		}
	}
}

func (s *Service) connect(ctx context.Context) (Store, error) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := s.opts.Open(cctx)
	if err != nil {
		return nil, err
	}
	if err := st.Migrate(cctx); err != nil {
		st.Close()
		return nil, fmt.Errorf("migrate: %w", err)
	}
	return st, nil
}

// backend is the store and queue once started (nil before).
func (s *Service) backend() (Store, Queue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store, s.queue
}

// noteErr records the last error for the heartbeat, and whether the
// database answers.
func (s *Service) noteErr(err error) {
	now := s.clock.Now().UTC()
	s.mu.Lock()
	s.lastErr, s.lastErrAt = err.Error(), &now
	s.mu.Unlock()
}

func (s *Service) setDBOK(ok bool) {
	s.mu.Lock()
	back := ok && !s.dbOK && s.store != nil
	s.dbOK = ok
	s.mu.Unlock()
	if back {
		select {
		case s.dbBack <- struct{}{}:
		default:
		}
	}
}

// webhookShown is the webhook URL as logs show it.
func webhookShown(u string) string {
	if u == "" {
		return "off"
	}
	return RedactURL(u)
}
