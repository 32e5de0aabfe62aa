package health

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

// Mount is a sub-application served under a path behind the token, with a
// lifecycle of its own (River UI).
type Mount interface {
	http.Handler
	Start(ctx context.Context) error
	Close()
}

// Options configure the health service. Zero values mean the defaults noted.
type Options struct {
	NC       *nats.Conn
	Listener net.Listener // bound by the caller, so $PORT is up before anything slow
	Session  string       // SESSION_ID
	Instance string
	Version  string
	Clock    clockwork.Clock // nil: the real clock
	Log      *slog.Logger

	Token      string // HEALTH_TOKEN
	Production bool
	// Heroku: requests come through Heroku's router. Its X-Forwarded-For
	// names the client (for the wrong-token budget) and X-Forwarded-Proto:
	// http sends the private pages to https; the cookie is always Secure.
	Heroku bool
	// PublicURL is HEROKU_APP_URL: the https redirect on Heroku goes to its
	// host, never to the Host a request names. Empty: plain http is refused.
	PublicURL string
	PairPhone string
	// HealthCheck is ENABLE_HEALTH_CHECK: heartbeat-based readiness and the
	// keep-awake ping. Off, /readyz only fails on a known bad WhatsApp state.
	HealthCheck   bool
	BackupEnabled bool

	KeepAwakeURL      string        // HEROKU_APP_URL; empty: no keep-awake
	KeepAwakeInterval time.Duration // zero: 25m
	HTTPClient        *http.Client  // for keep-awake; nil: a client with a 30 s timeout

	HeartbeatInterval time.Duration // zero: bus.HeartbeatInterval
	ShutdownGrace     time.Duration // zero: 5 s for in-flight requests
	// ReadTimeout and WriteTimeout bound one request (zero: 30 s and 60 s):
	// a client that sends or reads slowly cannot hold a connection open. The
	// pair page polls with short requests; River UI's API calls are short.
	ReadTimeout  time.Duration
	WriteTimeout time.Duration

	RiverUI Mount // nil: /riverui/ answers 404
	// Sandbox is WHATSAPP_SANDBOX: shown on /status, /metrics and /pair,
	// which then offers a "link now" button.
	Sandbox bool
	// Secrets are hidden from every string /status shows, a last line of
	// defence against an error message that quotes one.
	Secrets []string
}

// Service is the health HTTP service.
type Service struct {
	opts     Options
	log      *slog.Logger
	clock    clockwork.Clock
	subj     bus.Subjects
	tracker  *Tracker
	metrics  *metrics
	auth     *auth
	req      Requirements
	started  time.Time
	handler  http.Handler
	qr       qrCache
	subs     []*nats.Subscription
	riverErr error // River UI failed to start: /riverui/ says so
	riverMu  sync.RWMutex
}

// New builds the service and subscribes to the bus at once, so no event
// published after New returns is missed. Run must follow.
func New(opts Options) (*Service, error) {
	if opts.NC == nil {
		return nil, errors.New("health: no NATS connection")
	}
	if opts.Listener == nil {
		return nil, errors.New("health: no listener")
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	opts.KeepAwakeInterval = cmp.Or(opts.KeepAwakeInterval, 25*time.Minute)
	opts.ShutdownGrace = cmp.Or(opts.ShutdownGrace, 5*time.Second)
	opts.ReadTimeout = cmp.Or(opts.ReadTimeout, 30*time.Second)
	opts.WriteTimeout = cmp.Or(opts.WriteTimeout, 60*time.Second)
	opts.Version = cmp.Or(opts.Version, "dev")

	s := &Service{
		opts:    opts,
		log:     opts.Log,
		clock:   opts.Clock,
		subj:    bus.NewSubjects(opts.Session),
		started: opts.Clock.Now(),
		auth:    newAuth(opts.Token, opts.Production, opts.Heroku, opts.Clock.Now),
	}
	s.req = Requirements{Heartbeats: opts.HealthCheck, Services: []string{bus.ServiceGateway, bus.ServiceHealth}}
	if opts.BackupEnabled {
		s.req.Services = append(s.req.Services, bus.ServiceBackup)
	}
	s.tracker = NewTracker(opts.Clock, opts.HeartbeatInterval, opts.Log)
	s.metrics = newMetrics(s.tracker, s.req)
	s.tracker.metrics = s.metrics
	registerSandboxMetric(s.metrics, opts.Sandbox)
	s.handler = s.routes()
	subs, err := s.tracker.Subscribe(opts.NC, s.subj)
	if err != nil {
		return nil, fmt.Errorf("health: %w", err)
	}
	s.subs = subs
	return s, nil
}

// Tracker exposes the heartbeat tracker (tests, and cmd for diagnostics).
func (s *Service) Tracker() *Tracker { return s.tracker }

// Handler is the whole HTTP surface.
func (s *Service) Handler() http.Handler { return s.handler }

// Run serves until ctx ends, then stops accepting, lets in-flight requests
// finish (bounded by ShutdownGrace) and stops its heartbeat and keep-awake.
// The supervisor stops health last, so it answers while the others stop.
func (s *Service) Run(ctx context.Context) error {
	bg, stopBG := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		stopBG()
		wg.Wait()
		for _, sub := range s.subs {
			_ = sub.Unsubscribe()
		}
		if s.opts.RiverUI != nil {
			s.opts.RiverUI.Close()
		}
	}()

	hb := &bus.Heartbeater{
		NC: s.opts.NC, Subjects: s.subj, Session: s.opts.Session, Service: bus.ServiceHealth,
		Instance: s.opts.Instance, Clock: s.clock, Interval: s.opts.HeartbeatInterval,
		Beat: func() (string, any) {
			return bus.StateOK, bus.HealthDetails{Addr: s.opts.Listener.Addr().String()}
		},
	}
	wg.Go(func() { _ = hb.Run(bg) })

	if s.opts.HealthCheck && s.opts.KeepAwakeURL != "" {
		k := newKeepAwake(s.opts.KeepAwakeURL, s.opts.KeepAwakeInterval, s.clock, s.opts.HTTPClient, s.log, s.metrics)
		s.log.Info("keep-awake on", "url", config.RedactURL(k.target), "every", s.opts.KeepAwakeInterval)
		wg.Go(func() { k.run(bg) })
	}
	if s.opts.RiverUI != nil {
		if err := s.opts.RiverUI.Start(bg); err != nil {
			// The database may be down (CONTRACT: the bot stays online); the
			// rest of the service does not depend on it.
			s.log.Warn("river ui not started", "err", err)
			s.riverMu.Lock()
			s.riverErr = err
			s.riverMu.Unlock()
		}
	}

	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: min(10*time.Second, s.opts.ReadTimeout),
		ReadTimeout:       s.opts.ReadTimeout,
		WriteTimeout:      s.opts.WriteTimeout,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(s.opts.Listener) }()
	s.log.Info("health serving", "addr", s.opts.Listener.Addr().String(), "token", s.opts.Token != "")

	select {
	case err := <-errc:
		return fmt.Errorf("health: serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), s.opts.ShutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		s.log.Warn("health: requests still open at shutdown", "err", err)
		_ = srv.Close()
	}
	<-errc // Serve returned http.ErrServerClosed
	return nil
}
