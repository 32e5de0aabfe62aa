package backup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

// Errors a snapshot request may be answered with.
var (
	ErrNoDevice  = errors.New("not stored: the session has no linked device (not paired yet, or logged out)")
	ErrNoSession = errors.New("not stored: there is no session store yet")
	ErrStopping  = errors.New("backup service is stopping")
	ErrStandby   = errors.New("not stored: standby, another instance holds the session lease")
)

// Options configure a Service.
type Options struct {
	Config Config
	NC     *nats.Conn
	Log    *slog.Logger
	Clock  clockwork.Clock
	// Instance names this process: the lease holder and the heartbeat's
	// instance. It differs between any two processes.
	Instance string
	// Unit is the instance id this backup shares with its gateway (one run
	// process, or the gateway and backup processes of one DATA_DIR): it
	// answers P.session.restore.<Unit> only and stamps its conn.standby
	// events with it, so with a shared NATS no other instance's gateway
	// acts on them. Empty: Instance, made subject-safe.
	Unit string
	// Open connects to the database (PostgreSQL or SQLite); the service
	// migrates it and retries Open with backoff while it fails.
	Open func(ctx context.Context) (Store, error)
	// Outage collapses the log of a database outage (River logs each
	// failed fetch of each queue); give the same one to the store's pool
	// as its tracer (postgres.Options.Tracer) so it hears of the outage.
	// Nil: one of its own, which only River's log records tell of it.
	Outage *dboutage.Outage
}

// Service is the backup service: a runner for the role supervisor.
type Service struct {
	opts  Options
	cfg   Config
	log   *slog.Logger
	clock clockwork.Clock
	subj  bus.Subjects
	local Local
	lease *LeaseKeeper
	pipe  Pipeline
	incr  *Incremental // the pipeline when continuous replication is on

	sessionPath string
	unit        string
	beatKick    chan struct{} // publishes a heartbeat now
	// jobKey keeps this process's coalescing keys apart from a previous
	// process with the same instance name (a Heroku dyno keeps its name across
	// restarts), whose unfinished job would otherwise absorb our requests.
	jobKey string

	// epoch is the current lease epoch's restore answer (guarded by mu):
	// replaced when the lease is lost, so requests wait for the new restore.
	epoch    *epochState
	handlers sync.WaitGroup
	hmu      sync.Mutex // guards closed against handlers.Go racing Wait
	closed   bool
	stopping chan struct{}
	// life ends with stopping: the calls of handlers (a request's enqueue,
	// a point outside River, shipping the local fallback) end with Run.
	life      context.Context
	endLife   context.CancelFunc
	bgWG      sync.WaitGroup
	startedAt time.Time

	mu           sync.Mutex
	store        Store
	queue        Queue
	state        string
	inStandby    bool // the lease was lost; until the next restore is done
	dbOK         bool
	lastSnap     *bus.SnapshotRef
	lastDBSnapID int64
	lastSnapAt   *time.Time
	lastErr      string
	lastErrAt    *time.Time
	// lastSyncFailLog spaces the logs of failed sync points.
	lastSyncFailLog time.Time
}

var _ interface{ Run(context.Context) error } = (*Service)(nil)

// New checks the configuration and builds the service; Run starts it. In
// production a missing SESSION_ENCRYPTION_KEY is a configuration error unless
// ALLOW_PLAINTEXT_BACKUPS=true: better to refuse to start than to store a
// WhatsApp session in the clear by accident.
func New(opts Options) (*Service, error) {
	cfg := opts.Config.withDefaults()
	if cfg.Production && len(cfg.EncryptionKey) == 0 && !cfg.AllowPlaintext {
		return nil, &config.Error{Var: "SESSION_ENCRYPTION_KEY",
			Accepts: "a 32-byte key in production (64 hex chars: openssl rand -hex 32), or ALLOW_PLAINTEXT_BACKUPS=true to store plaintext snapshots",
			Got:     "nothing"}
	}
	if cfg.SessionID == "" || cfg.DataDir == "" {
		return nil, errors.New("backup: Config.SessionID and Config.DataDir are required")
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Instance == "" {
		opts.Instance = "backup-" + nonce()
	}
	if opts.Unit == "" {
		opts.Unit = bus.InstanceToken(opts.Instance)
	}
	if err := bus.CheckInstance(opts.Unit); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	if opts.Open == nil || opts.NC == nil {
		return nil, errors.New("backup: Open and NC are required")
	}
	opts.Config = cfg
	if opts.Outage == nil {
		opts.Outage = dboutage.New(opts.Log.With("service", bus.ServiceBackup), "backup")
	}
	s := &Service{
		opts:        opts,
		cfg:         cfg,
		log:         opts.Log.With("service", bus.ServiceBackup),
		clock:       opts.Clock,
		subj:        bus.NewSubjects(cfg.SessionID),
		local:       Local{Dir: filepath.Join(cfg.DataDir, "backups")},
		sessionPath: filepath.Join(cfg.DataDir, "session.db"),
		jobKey:      opts.Instance + "/" + nonce(),
		unit:        opts.Unit,
		beatKick:    make(chan struct{}, 1),
		epoch:       &epochState{},
		stopping:    make(chan struct{}),
		state:       bus.StateStarting,
	}
	s.life, s.endLife = context.WithCancel(context.Background())
	s.lease = NewLeaseKeeper(LeaseConfig{Session: cfg.SessionID, Holder: opts.Instance, TTL: cfg.LeaseTTL,
		StandbyRetry: cfg.StandbyRetry, DBWait: cfg.DBWait, Clock: s.clock, Log: s.log, Observer: leaseObserver{s}})
	if cfg.SyncInterval > 0 {
		s.incr = NewIncremental(IncrementalConfig{Session: cfg.SessionID, Holder: opts.Instance, SessionPath: s.sessionPath,
			Key: cfg.EncryptionKey, Local: s.localPoints(), Policy: cfg.Policy, Retention: Retention{Count: cfg.Retention, Age: cfg.RetentionAge},
			Clock: s.clock, Log: s.log, Lease: s.lease,
			Database: s.databaseCall, Report: s.report})
		s.pipe = s.incr
		return s, nil
	}
	s.pipe = NewSnapshots(SnapshotsConfig{Session: cfg.SessionID, Holder: opts.Instance, SessionPath: s.sessionPath,
		TmpDir: cfg.DataDir, Key: cfg.EncryptionKey, Local: s.local, Retention: Retention{Count: cfg.Retention, Age: cfg.RetentionAge},
		Clock: s.clock, Log: s.log, Lease: s.lease, Database: s.databaseCall, Report: s.report})
	return s, nil
}

// localPoints is the incremental local fallback under the snapshots'.
func (s *Service) localPoints() LocalPoints {
	return LocalPoints{Dir: filepath.Join(s.local.Dir, "incr")}
}

// SessionPath is where the gateway's store lives.
func (s *Service) SessionPath() string { return s.sessionPath }

// Run opens the database, takes the lease, restores, serves requests and
// snapshots until ctx ends, then takes the shutdown snapshot and releases
// the lease. It returns nil after a graceful stop.
//
// Losing the lease to another instance at runtime ends an epoch: the
// service announces conn.standby (the gateway closes its socket), stops
// River, waits for the lease again, restores what the other instance left
// and only then answers P.session.restore again.
func (s *Service) Run(ctx context.Context) error {
	s.startedAt = s.clock.Now()
	if err := os.MkdirAll(s.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("backup: DATA_DIR: %w", err)
	}
	s.narrowOldFiles()
	bg, bgCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer bgCancel()
	defer func() { _ = s.pipe.Close() }()

	hbCtx, hbStop := context.WithCancel(context.WithoutCancel(ctx))
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		hb := &bus.Heartbeater{NC: s.opts.NC, Subjects: s.subj, Session: s.cfg.SessionID, Service: bus.ServiceBackup,
			Instance: s.opts.Instance, Clock: s.clock, Beat: s.beat, Kick: s.beatKick}
		_ = hb.Run(hbCtx)
	}()
	defer func() { hbStop(); <-hbDone }()

	restoreSub, err := s.opts.NC.Subscribe(s.subj.SessionRestoreFor(s.unit), s.onRestore)
	if err != nil {
		return fmt.Errorf("backup: subscribe: %w", err)
	}
	beatSub, err := s.opts.NC.Subscribe(s.subj.Heartbeat(bus.ServiceBackup), s.onHeartbeatMsg)
	if err != nil {
		_ = restoreSub.Unsubscribe()
		return fmt.Errorf("backup: subscribe: %w", err)
	}
	defer func() {
		_ = restoreSub.Unsubscribe()
		_ = beatSub.Unsubscribe()
		s.hmu.Lock()
		s.closed = true
		close(s.stopping)
		s.endLife()
		s.hmu.Unlock()
		s.answerPending(bus.RestoreReply{OK: false, Error: ErrStopping.Error()})
		s.handlers.Wait()
	}()

	var subs []*nats.Subscription
	defer func() {
		for _, sub := range subs {
			_ = sub.Unsubscribe()
		}
	}()
	store := s.openStore(ctx)
	for first := true; ; first = false {
		tookOver := false
		if store != nil {
			var err error
			if tookOver, err = s.lease.Acquire(ctx, store, !first); err != nil {
				store.Close()
				if ctx.Err() != nil { // stopped while in standby: nothing of ours to save
					return nil
				}
				s.log.Warn("database failing and no other holder seen; continuing degraded on the local fallback", "err", err)
				store = nil
			}
		}
		if ctx.Err() != nil {
			if store != nil {
				s.lease.Release(context.Background(), store)
				store.Close()
			}
			return nil
		}
		var rep bus.RestoreReply
		switch {
		case first && tookOver:
			rep = s.restoreAfterTakeover(ctx, store)
		case first:
			rep = s.restoreOnStart(ctx, store)
		case store != nil && s.lease.Kept():
			// Fenced, and the lease is ours again without anyone having
			// held it meanwhile: the store on disk is still the newest.
			s.log.Info("session lease renewed after fencing; nobody held it meanwhile: the store on disk stays")
			rep = bus.RestoreReply{OK: true, Source: bus.SourceExisting, Instance: s.unit}
		default:
			s.pipe.Disown() // another instance's store replaces ours
			rep = s.restoreAfterLeaseLoss(ctx, store)
		}
		if ctx.Err() != nil {
			// Stopped while waiting for the database: nothing restored,
			// nothing of ours to save.
			if store != nil {
				s.lease.Release(context.Background(), store)
				store.Close()
			}
			return nil
		}
		if store != nil {
			if err := s.startQueue(store); err != nil {
				s.log.Error("river did not start; continuing degraded", "err", err)
				s.lease.Release(context.Background(), store)
				store.Close()
				store = nil
			}
		}
		epoch, endEpoch := context.WithCancel(bg)
		lost := s.lease.Term()
		if store == nil {
			s.setDB(nil, nil, false)
			s.bgWG.Go(func() { s.reconnect(epoch) })
		} else {
			s.lease.Start(epoch, store)
		}
		s.bgWG.Go(func() { s.fallbackTicker(epoch) })
		if s.incr != nil {
			s.bgWG.Go(func() { s.syncLoop(epoch) })
		}

		if first {
			for subj, h := range map[string]nats.MsgHandler{
				s.subj.BackupRequest():              s.onBackupRequest,
				s.subj.Conn(bus.ConnPaired):         s.ownGateway(func() { s.request(bus.ReasonPaired, nil) }),
				s.subj.Conn(bus.ConnStopped):        s.ownGateway(func() { s.request(bus.ReasonShutdown, nil) }),
				s.subj.Conn(bus.ConnStreamReplaced): s.ownGateway(s.lease.StreamReplaced),
			} {
				sub, err := s.opts.NC.Subscribe(subj, h)
				if err != nil {
					endEpoch()
					s.bgWG.Wait()
					s.lease.Stop()
					return fmt.Errorf("backup: subscribe %s: %w", subj, err)
				}
				subs = append(subs, sub)
			}
		}
		// Answer P.session.restore only now: once the gateway hears back, it
		// may ask for snapshots at once.
		s.markReady(rep)

		select {
		case <-ctx.Done():
			for _, sub := range subs {
				_ = sub.Unsubscribe()
			}
			subs = nil
			s.shutdown(bgCancel)
			endEpoch()
			return nil
		case <-lost:
		}
		endEpoch()
		s.bgWG.Wait()
		s.lease.Stop()
		store = s.enterStandby()
		if store == nil {
			store = s.openStore(ctx)
		}
	}
}

// onHeartbeatMsg feeds other instances' backup heartbeats to the fencing
// rule (LeaseKeeper.Contender).
func (s *Service) onHeartbeatMsg(m *nats.Msg) {
	var hb bus.Heartbeat
	var d bus.BackupDetails
	if json.Unmarshal(m.Data, &hb) != nil || json.Unmarshal(hb.Details, &d) != nil {
		return
	}
	s.lease.Contender(hb, d)
}

// ownGateway runs f for a connection event of our own instance's gateway:
// on a shared bus, another instance's paired or stopped is not about the
// store we snapshot.
func (s *Service) ownGateway(f func()) nats.MsgHandler {
	return func(m *nats.Msg) {
		var ev bus.ConnEvent
		if json.Unmarshal(m.Data, &ev) == nil && ev.Instance == s.unit {
			f()
		}
	}
}

// enterStandby stops River after a lost lease, re-arms the restore answer
// and tells the gateway to close its socket. It returns the store to wait
// for the lease on.
func (s *Service) enterStandby() Store {
	s.mu.Lock()
	s.state = bus.StateStandby
	s.epoch = &epochState{}
	s.inStandby = true
	s.mu.Unlock()
	s.publishStandby("lease lost: another instance may hold the session")
	st, q := s.backend()
	if q != nil {
		// Not the service's life: a shutdown must not cut River's stop short.
		ctx, cancel := clockctx.WithTimeout(context.Background(), s.clock, 15*time.Second)
		if err := q.Stop(ctx); err != nil {
			s.log.Warn("river stop", "err", err)
		}
		cancel()
	}
	s.mu.Lock()
	s.store, s.queue = nil, nil
	s.mu.Unlock()
	s.pipe.Requeue()
	return st
}

func (s *Service) restorer(st Store) *Restorer {
	r := &Restorer{Session: s.cfg.SessionID, SessionPath: s.sessionPath, Local: s.local, LocalPoints: s.localPoints(),
		TmpDir: s.cfg.DataDir, Key: s.cfg.EncryptionKey, AllowPlaintext: s.cfg.AllowPlaintext, Log: s.log}
	if st != nil {
		r.Store = st
	}
	return r
}

// Per-call bounds of database calls: a hung connection must not hold a
// snapshot (or the shutdown) forever.
const (
	dbCallTimeout  = 10 * time.Second
	releaseTimeout = 5 * time.Second
)

// insertTimeout bounds one snapshot insert: 15 s plus a second per 4 MB.
func insertTimeout(stored int) time.Duration {
	return 15*time.Second + time.Duration(stored/(4<<20))*time.Second
}

func nonce() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
