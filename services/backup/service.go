package backup

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
)

// Defaults of Options.
const (
	DefaultLeaseTTL     = 60 * time.Second
	DefaultDBWait       = 20 * time.Second
	DefaultReplyTimeout = 2 * time.Minute
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
	Config   *config.Config
	NC       *nats.Conn
	Log      *slog.Logger
	Clock    clockwork.Clock
	Instance string
	// Open connects to the database (PostgreSQL or SQLite); the service
	// migrates it and retries Open with backoff while it fails.
	Open func(ctx context.Context) (Store, error)

	LeaseTTL     time.Duration // zero: DefaultLeaseTTL
	StandbyRetry time.Duration // how often a standby instance asks again; zero: LeaseTTL/6
	DBWait       time.Duration // how long start waits for the database before going degraded
	ReplyTimeout time.Duration // how long a request waits for its snapshot
	// QueuePollInterval overrides River's poll interval (tests).
	QueuePollInterval time.Duration
}

// Service is the backup service: a runner for the role supervisor.
type Service struct {
	opts  Options
	cfg   *config.Config
	log   *slog.Logger
	clock clockwork.Clock
	subj  bus.Subjects
	co    *coalescer
	local Local

	sessionPath string
	// jobKey keeps this process's coalescing keys apart from a previous
	// process with the same instance name (a Heroku dyno keeps its name across
	// restarts), whose unfinished job would otherwise absorb our requests.
	jobKey  string
	snapSem chan struct{} // one snapshot at a time, River or direct

	// epoch is the current lease epoch's restore answer (guarded by mu):
	// replaced when the lease is lost, so requests wait for the new restore.
	epoch     *epochState
	handlers  sync.WaitGroup
	hmu       sync.Mutex // guards closed against handlers.Go racing Wait
	closed    bool
	stopping  chan struct{}
	bgWG      sync.WaitGroup
	startedAt time.Time

	mu         sync.Mutex
	store      Store
	queue      Queue
	state      string
	leaseHeld  bool
	leaseUntil time.Time     // our lease's expiry as last written
	lost       chan struct{} // closed when this epoch loses the lease
	lostFired  bool
	inStandby  bool // the lease was lost; until the next restore is done
	dbOK       bool
	lastSnap   *bus.SnapshotRef
	lastSnapAt *time.Time
	lastErr    string
	lastErrAt  *time.Time
}

var _ interface{ Run(context.Context) error } = (*Service)(nil)

// New checks the configuration and builds the service; Run starts it. In
// production a missing SESSION_ENCRYPTION_KEY is a configuration error unless
// ALLOW_PLAINTEXT_BACKUPS=true: better to refuse to start than to store a
// WhatsApp session in the clear by accident.
func New(opts Options) (*Service, error) {
	cfg := opts.Config
	if cfg.Production && len(cfg.SessionEncryptionKey) == 0 && !cfg.AllowPlaintextBackups {
		return nil, &config.Error{Var: "SESSION_ENCRYPTION_KEY",
			Accepts: "a 32-byte key in production (64 hex chars: openssl rand -hex 32), or ALLOW_PLAINTEXT_BACKUPS=true to store plaintext snapshots",
			Got:     "nothing"}
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.LeaseTTL == 0 {
		opts.LeaseTTL = DefaultLeaseTTL
	}
	if opts.StandbyRetry == 0 {
		opts.StandbyRetry = opts.LeaseTTL / 6
	}
	if opts.DBWait == 0 {
		opts.DBWait = DefaultDBWait
	}
	if opts.ReplyTimeout == 0 {
		opts.ReplyTimeout = DefaultReplyTimeout
	}
	if opts.Open == nil || opts.NC == nil {
		return nil, errors.New("backup: Open and NC are required")
	}
	return &Service{
		opts:        opts,
		cfg:         cfg,
		log:         opts.Log.With("service", bus.ServiceBackup),
		clock:       opts.Clock,
		subj:        bus.NewSubjects(cfg.SessionID),
		co:          newCoalescer(),
		local:       Local{Dir: filepath.Join(cfg.DataDir, "backups")},
		sessionPath: filepath.Join(cfg.DataDir, "session.db"),
		jobKey:      opts.Instance + "/" + nonce(),
		epoch:       &epochState{},
		snapSem:     make(chan struct{}, 1),
		stopping:    make(chan struct{}),
		state:       bus.StateStarting,
	}, nil
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

	hbCtx, hbStop := context.WithCancel(context.WithoutCancel(ctx))
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		hb := &bus.Heartbeater{NC: s.opts.NC, Subjects: s.subj, Session: s.cfg.SessionID, Service: bus.ServiceBackup,
			Instance: s.opts.Instance, Clock: s.clock, Beat: s.beat}
		_ = hb.Run(hbCtx)
	}()
	defer func() { hbStop(); <-hbDone }()

	restoreSub, err := s.opts.NC.Subscribe(s.subj.SessionRestore(), s.onRestore)
	if err != nil {
		return fmt.Errorf("backup: subscribe: %w", err)
	}
	defer func() {
		_ = restoreSub.Unsubscribe()
		s.hmu.Lock()
		s.closed = true
		close(s.stopping)
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
		if store != nil {
			if err := s.acquireLease(ctx, store, !first); err != nil {
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
				s.release(context.Background(), store)
				store.Close()
			}
			return nil
		}
		var rep bus.RestoreReply
		if first {
			rep = s.restoreOnStart(ctx, store)
		} else {
			rep = s.restoreAfterLeaseLoss(ctx, store)
		}
		if ctx.Err() != nil {
			// Stopped while waiting for the database: nothing restored,
			// nothing of ours to save.
			if store != nil {
				s.release(context.Background(), store)
				store.Close()
			}
			return nil
		}
		if store != nil {
			if err := s.startQueue(store); err != nil {
				s.log.Error("river did not start; continuing degraded", "err", err)
				s.release(context.Background(), store)
				store.Close()
				store = nil
			}
		}
		epoch, endEpoch := context.WithCancel(bg)
		lost := s.armLeaseLost()
		if store == nil {
			s.setDB(nil, nil, false)
			s.bgWG.Go(func() { s.reconnect(epoch) })
		} else {
			s.bgWG.Go(func() { s.renewLoop(epoch) })
		}
		s.bgWG.Go(func() { s.fallbackTicker(epoch) })

		if first {
			for subj, h := range map[string]nats.MsgHandler{
				s.subj.BackupRequest():       s.onBackupRequest,
				s.subj.Conn(bus.ConnPaired):  func(*nats.Msg) { s.request(bus.ReasonPaired, nil) },
				s.subj.Conn(bus.ConnStopped): func(*nats.Msg) { s.request(bus.ReasonShutdown, nil) },
			} {
				sub, err := s.opts.NC.Subscribe(subj, h)
				if err != nil {
					endEpoch()
					s.bgWG.Wait()
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
		store = s.enterStandby()
		if store == nil {
			store = s.openStore(ctx)
		}
	}
}

// epochState is what P.session.restore answers for one lease epoch.
type epochState struct {
	done    bool
	reply   bus.RestoreReply
	pending []*nats.Msg // requests waiting for the restore
}

// maxPendingRestore bounds the requests kept while a restore runs: a
// gateway retrying on a timeout has given up on the older ones.
const maxPendingRestore = 32

// markReady records the restore's answer and answers everyone waiting.
func (s *Service) markReady(rep bus.RestoreReply) {
	s.mu.Lock()
	ep := s.epoch
	ep.done, ep.reply = true, rep
	s.inStandby = false
	pending := ep.pending
	ep.pending = nil
	s.mu.Unlock()
	s.setState()
	for _, m := range pending {
		_ = bus.Respond(m, rep)
	}
}

func (s *Service) answerPending(rep bus.RestoreReply) {
	s.mu.Lock()
	pending := s.epoch.pending
	s.epoch.pending = nil
	s.mu.Unlock()
	for _, m := range pending {
		_ = bus.Respond(m, rep)
	}
}

// armLeaseLost returns a channel closed once this epoch loses the lease.
func (s *Service) armLeaseLost() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lost, s.lostFired = make(chan struct{}), false
	return s.lost
}

// leaseLost ends the epoch: another instance holds the lease.
func (s *Service) leaseLost(holder string) {
	s.mu.Lock()
	s.leaseHeld = false
	fire := s.lost != nil && !s.lostFired
	if fire {
		s.lostFired = true
		close(s.lost)
	}
	s.mu.Unlock()
	if fire {
		s.noteErr(errors.New("session lease lost to " + holder))
		s.log.Error("session lease lost to another instance; standby: database snapshots stop until the lease is ours again", "holder", holder)
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
	ev := bus.ConnEvent{Kind: bus.ConnStandby, Reason: "lease lost to another instance"}
	ev.Stamp(s.cfg.SessionID, s.clock.Now())
	_ = bus.Publish(s.opts.NC, s.subj.Conn(bus.ConnStandby), ev)
	st, q := s.backend()
	if q != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		if err := q.Stop(ctx); err != nil {
			s.log.Warn("river stop", "err", err)
		}
		cancel()
	}
	s.mu.Lock()
	s.store, s.queue = nil, nil
	s.mu.Unlock()
	s.co.mu.Lock()
	clear(s.co.queued)
	s.co.mu.Unlock()
	return st
}

// openStore connects and migrates, retrying with backoff; nil means
// degraded (database unreachable). It gives up after DBWait only when there
// is something local to run on (a session store or a fallback snapshot): on an
// empty disk, starting unlinked would show a QR code while the real session
// sits in the database, so it keeps waiting for the database instead.
func (s *Service) openStore(ctx context.Context) Store {
	deadline := s.clock.Now().Add(s.opts.DBWait)
	delay := 500 * time.Millisecond
	for {
		st, err := s.connect(ctx)
		if err == nil {
			return st
		}
		s.noteErr(err)
		if ctx.Err() != nil {
			return nil
		}
		s.mu.Lock()
		s.state, s.dbOK = bus.StateDegraded, false
		s.mu.Unlock()
		if !s.clock.Now().Add(delay).Before(deadline) {
			if s.hasLocalState() {
				s.log.Warn("database unreachable; degraded: restore and snapshots use the local fallback", "err", err)
				return nil
			}
			s.log.Warn("database unreachable and nothing local to restore from; waiting for the database", "err", err, "retry_in", delay)
		} else {
			s.log.Warn("database unreachable; retrying", "err", err, "retry_in", delay)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.clock.After(delay):
		}
		delay = min(delay*2, 10*time.Second)
	}
}

// hasLocalState reports whether the disk holds a session store or a
// fallback snapshot.
func (s *Service) hasLocalState() bool {
	if _, err := os.Stat(s.sessionPath); err == nil {
		return true
	}
	files, _ := s.local.List()
	return len(files) > 0
}

func (s *Service) connect(ctx context.Context) (Store, error) {
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
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

// acquireLease blocks until this instance holds the lease: while another live
// holder has it, it is standby. Database errors are retried with backoff,
// staying in standby: only when no other holder has been seen (otherSeen is
// false and no attempt found one), the database has failed for DBWait and
// there is local state to run on does it give up, and Run goes degraded.
func (s *Service) acquireLease(ctx context.Context, st Store, otherSeen bool) error {
	announced := false
	var failingSince time.Time
	delay := time.Second
	for {
		cctx, cancel := withTimeout(ctx, s.clock, s.opts.LeaseTTL/3)
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		wait := s.opts.StandbyRetry
		switch {
		case err != nil:
			s.noteErr(fmt.Errorf("take lease: %w", err))
			if failingSince.IsZero() {
				failingSince = s.clock.Now()
			}
			s.mu.Lock()
			s.dbOK = false
			if otherSeen {
				s.state = bus.StateStandby
			} else {
				s.state = bus.StateDegraded
			}
			s.mu.Unlock()
			if !otherSeen && s.clock.Since(failingSince) >= s.opts.DBWait && s.hasLocalState() {
				return err
			}
			s.log.Warn("taking the session lease failed; retrying", "err", err, "retry_in", delay)
			wait = delay
			delay = min(delay*2, 10*time.Second)
		case ok:
			s.mu.Lock()
			s.leaseHeld, s.dbOK, s.leaseUntil = true, true, lease.ExpiresAt
			s.mu.Unlock()
			s.log.Info("session lease held", "ttl", s.opts.LeaseTTL)
			return nil
		default:
			failingSince, delay = time.Time{}, time.Second
			if lease.Holder != "" && lease.Holder != s.opts.Instance {
				otherSeen = true
			}
			if !announced {
				s.log.Warn("another instance holds the session; standby until it releases the lease or the lease expires",
					"holder", lease.Holder, "expires_at", lease.ExpiresAt)
				announced = true
			}
			s.mu.Lock()
			s.state, s.dbOK = bus.StateStandby, true
			s.mu.Unlock()
			ev := bus.ConnEvent{Kind: bus.ConnStandby, Reason: "another instance holds the session lease until " + lease.ExpiresAt.Format(time.RFC3339)}
			ev.Stamp(s.cfg.SessionID, s.clock.Now())
			_ = bus.Publish(s.opts.NC, s.subj.Conn(bus.ConnStandby), ev)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.clock.After(wait):
		}
	}
}

// renewLoop renews the lease every TTL/3 on the injected clock. Each renewal
// gets TTL/3 itself: a blackholed database turns the state degraded instead
// of hanging the loop.
func (s *Service) renewLoop(ctx context.Context) {
	t := s.clock.NewTicker(s.opts.LeaseTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.Chan():
		}
		st, _ := s.backend()
		if st == nil {
			continue
		}
		cctx, cancel := withTimeout(ctx, s.clock, s.opts.LeaseTTL/3)
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		wasOK := s.dbOK
		s.dbOK = err == nil
		wasHeld := s.leaseHeld
		if err == nil && ok {
			s.leaseHeld, s.leaseUntil = true, lease.ExpiresAt
		}
		s.mu.Unlock()
		switch {
		case err != nil:
			s.noteErr(fmt.Errorf("renew lease: %w", err))
			s.log.Warn("lease renewal failed", "err", err)
		case !ok && lease.Holder != "" && lease.Holder != s.opts.Instance:
			s.leaseLost(lease.Holder)
			return
		case ok && !wasHeld:
			s.log.Info("session lease held again")
		}
		if err == nil && !wasOK {
			// The database is back: let it catch up at once (guarantee 4).
			s.log.Info("database answers again; requesting a snapshot")
			s.request(bus.ReasonScheduled, nil)
		}
		s.setState()
	}
}

// fallbackTicker takes a local-fallback snapshot every BACKUP_INTERVAL while
// the database is down: River's scheduled job cannot run then (guarantee 4).
func (s *Service) fallbackTicker(ctx context.Context) {
	if s.cfg.BackupInterval <= 0 {
		return
	}
	t := s.clock.NewTicker(s.cfg.BackupInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.Chan():
		}
		s.mu.Lock()
		down := s.store == nil || s.queue == nil || !s.dbOK
		s.mu.Unlock()
		if down {
			s.log.Info("database down: scheduled snapshot to the local fallback")
			s.spawn(func() { s.direct(bus.ReasonScheduled) })
		}
	}
}

// reconnect runs while degraded: once the database answers, it takes the
// lease, starts River and stores a fresh snapshot there (guarantee 4). If
// another instance holds the lease by then, the epoch ends (standby).
func (s *Service) reconnect(ctx context.Context) {
	delay := time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.clock.After(delay):
		}
		delay = min(delay*2, 30*time.Second)
		st, err := s.connect(ctx)
		if err != nil {
			s.noteErr(err)
			continue
		}
		cctx, cancel := withTimeout(ctx, s.clock, s.opts.LeaseTTL/3)
		lease, ok, err := st.AcquireLease(cctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		cancel()
		if err != nil {
			s.noteErr(fmt.Errorf("take lease: %w", err))
			st.Close()
			continue
		}
		if !ok {
			if lease.Holder == "" || lease.Holder == s.opts.Instance {
				st.Close()
				continue
			}
			s.mu.Lock()
			s.store, s.dbOK = st, true
			s.mu.Unlock()
			s.leaseLost(lease.Holder)
			return
		}
		s.mu.Lock()
		s.leaseHeld, s.leaseUntil = true, lease.ExpiresAt
		s.mu.Unlock()
		if err := s.startQueue(st); err != nil {
			s.noteErr(err)
			s.release(ctx, st)
			st.Close()
			continue
		}
		s.log.Info("database back: snapshots go to it again")
		s.request(bus.ReasonScheduled, nil)
		s.renewLoop(ctx)
		return
	}
}

func (s *Service) startQueue(st Store) error {
	q, err := st.NewQueue(QueueConfig{
		Work:         s.work,
		Interval:     s.cfg.BackupInterval,
		Instance:     s.jobKey,
		Logger:       s.log,
		PollInterval: s.opts.QueuePollInterval,
	})
	if err != nil {
		return err
	}
	if err := q.Start(context.WithoutCancel(context.Background())); err != nil {
		return err
	}
	s.setDB(st, q, true)
	return nil
}

func (s *Service) setDB(st Store, q Queue, ok bool) {
	s.mu.Lock()
	s.store, s.queue, s.dbOK = st, q, ok
	s.mu.Unlock()
	// Jobs of a previous queue will never run here: forget them.
	s.co.mu.Lock()
	clear(s.co.queued)
	s.co.mu.Unlock()
	s.setState()
}

func (s *Service) backend() (Store, Queue) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store, s.queue
}

func (s *Service) restorer(st Store) *Restorer {
	return &Restorer{Store: st, Session: s.cfg.SessionID, SessionPath: s.sessionPath, Local: s.local,
		TmpDir: s.cfg.DataDir, Key: s.cfg.SessionEncryptionKey, AllowPlaintext: s.cfg.AllowPlaintextBackups, Log: s.log}
}

// restoreOnStart restores if needed and returns the P.session.restore
// answer. A database failure is not a verdict on the snapshots: it retries
// the database (degraded, no answer yet) and falls back to the local
// snapshots only when the database stays down for DBWait and there is local
// state. On an empty disk, answering "nothing to restore" would start the
// gateway unlinked while the session sits in the database (guarantee 1).
func (s *Service) restoreOnStart(ctx context.Context, st Store) bus.RestoreReply {
	return s.restoreRetrying(ctx, st, func(r *Restorer) (RestoreResult, error) { return r.RestoreOnStart(ctx) }, true)
}

// restoreAfterLeaseLoss restores the newest database snapshot once the
// lease is ours again: another instance used the session meanwhile, so the
// store on disk (and the local fallback) is older than the one it left.
func (s *Service) restoreAfterLeaseLoss(ctx context.Context, st Store) bus.RestoreReply {
	if st == nil {
		return bus.RestoreReply{OK: false, Error: "restore after a lost lease needs the database"}
	}
	return s.restoreRetrying(ctx, st, func(r *Restorer) (RestoreResult, error) {
		r.DatabaseOnly = true
		res, err := r.Restore(ctx, 0)
		if err == nil && !res.Restored {
			res.Source = bus.SourceExisting
		}
		return res, err
	}, false)
}

func (s *Service) restoreRetrying(ctx context.Context, st Store, do func(*Restorer) (RestoreResult, error), localFallback bool) bus.RestoreReply {
	deadline := s.clock.Now().Add(s.opts.DBWait)
	delay := time.Second
	for {
		res, err := do(s.restorer(st))
		if err == nil || st == nil || !IsDBError(err) {
			return s.restoreReply(res, err)
		}
		s.noteErr(err)
		s.mu.Lock()
		s.state, s.dbOK = bus.StateDegraded, false
		s.mu.Unlock()
		if localFallback && !s.clock.Now().Before(deadline) && s.hasLocalState() {
			s.log.Warn("database keeps failing during restore; using the local fallback", "err", err)
			res, err = do(s.restorer(nil))
			return s.restoreReply(res, err)
		}
		s.log.Warn("database failed during restore; retrying before answering the gateway", "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return bus.RestoreReply{OK: false, Error: ErrStopping.Error()}
		case <-s.clock.After(delay):
		}
		delay = min(delay*2, 10*time.Second)
	}
}

func (s *Service) restoreReply(res RestoreResult, err error) bus.RestoreReply {
	if err != nil {
		s.log.Error("restore failed; the session store was left as it was", "err", err)
		s.noteErr(err)
		return bus.RestoreReply{OK: false, Error: err.Error()}
	}
	s.log.Info("session store ready", "restored", res.Restored, "source", res.Source, "snapshot_id", res.SnapshotID)
	return bus.RestoreReply{OK: true, Restored: res.Restored, Source: res.Source, SnapshotID: res.SnapshotID}
}

// onRestore answers P.session.restore once the restore of the current
// epoch is done. Waiting requests are kept in a bounded list, not one
// goroutine each: a gateway retrying every few seconds must not pile them up.
func (s *Service) onRestore(m *nats.Msg) {
	if m.Reply == "" {
		return
	}
	s.hmu.Lock()
	closed := s.closed
	s.hmu.Unlock()
	if closed {
		_ = bus.Respond(m, bus.RestoreReply{OK: false, Error: ErrStopping.Error()})
		return
	}
	s.mu.Lock()
	ep := s.epoch
	if !ep.done {
		if len(ep.pending) >= maxPendingRestore {
			ep.pending = ep.pending[1:]
		}
		ep.pending = append(ep.pending, m)
		s.mu.Unlock()
		return
	}
	rep := ep.reply
	s.mu.Unlock()
	_ = bus.Respond(m, rep)
}

// onBackupRequest handles P.backup.request.
func (s *Service) onBackupRequest(m *nats.Msg) {
	req, err := bus.DecodeBackupRequest(m.Data)
	if err != nil {
		if m.Reply != "" {
			_ = bus.Respond(m, bus.BackupReply{OK: false, Error: err.Error()})
		}
		return
	}
	s.request(req.Reason, m)
}

// request asks for a snapshot that covers now; m (when it has a reply
// subject) is answered once that snapshot is committed.
func (s *Service) request(reason string, m *nats.Msg) {
	want := m != nil && m.Reply != ""
	s.mu.Lock()
	standby := s.inStandby
	s.mu.Unlock()
	if standby {
		// The session is another instance's now: nothing of ours to store.
		if want {
			_ = bus.Respond(m, reply(outcome{Err: ErrStandby}))
		}
		return
	}
	w, gen, enqueue := s.co.add(reason, want)
	if enqueue {
		if _, q := s.backend(); q != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := q.Enqueue(ctx, reason, gen)
			cancel()
			if err != nil {
				s.log.Warn("enqueue failed; snapshot goes to the local fallback", "reason", reason, "err", err)
				s.noteErr(err)
				s.spawn(func() { s.direct(reason) })
			}
		} else {
			s.spawn(func() { s.direct(reason) })
		}
	}
	if w == nil {
		return
	}
	spawned := s.spawn(func() {
		var o outcome
		select {
		case o = <-w.ch:
		case <-s.clock.After(s.opts.ReplyTimeout):
			s.co.remove(w)
			o = outcome{Err: errors.New("no snapshot committed within " + s.opts.ReplyTimeout.String())}
		case <-s.stopping:
			s.co.remove(w)
			o = outcome{Err: ErrStopping}
		}
		_ = bus.Respond(m, reply(o))
	})
	if !spawned {
		s.co.remove(w)
		_ = bus.Respond(m, reply(outcome{Err: ErrStopping}))
	}
}

// spawn runs f in a tracked goroutine unless Run is ending: a NATS callback
// may still be running after Unsubscribe.
func (s *Service) spawn(f func()) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.closed {
		return false
	}
	s.handlers.Go(f)
	return true
}

func reply(o outcome) bus.BackupReply {
	if o.Err != nil {
		return bus.BackupReply{OK: false, JobID: o.JobID, Error: o.Err.Error()}
	}
	ref := o.Ref
	return bus.BackupReply{OK: true, JobID: o.JobID, Snapshot: &ref}
}

// direct takes a snapshot outside River: the database is unreachable, so it
// goes to the local fallback only.
func (s *Service) direct(reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, _ = s.snapshot(ctx, JobInfo{Reason: reason, Attempt: 1, MaxAttempts: 1}, nil, nil)
}

// work is the River worker.
func (s *Service) work(ctx context.Context, job JobInfo, complete TxHook) error {
	st, _ := s.backend()
	_, err := s.snapshot(ctx, job, st, complete)
	if errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoSession) || errors.Is(err, ErrLeaseLost) {
		return nil // nothing to store (or not ours to store) is not a failure to retry
	}
	return err
}

// snapshot takes one snapshot: consistent copy, device check, sha256,
// encode, local fallback, then the database row in the same transaction as
// the job's completion (st nil: local only). It answers the requests it
// covers and publishes P.backup.done or P.backup.failed.
func (s *Service) snapshot(ctx context.Context, job JobInfo, st Store, complete TxHook) (o outcome, err error) {
	select {
	case s.snapSem <- struct{}{}:
	case <-ctx.Done():
		return o, fmt.Errorf("snapshot: %w", ctx.Err())
	}
	// The semaphore covers reading, verifying and the local write only: a
	// database call that hangs must not keep the shutdown snapshot from
	// reaching the local fallback.
	semHeld := true
	unlockSem := func() {
		if semHeld {
			semHeld = false
			<-s.snapSem
		}
	}
	defer unlockSem()
	n := s.co.beginRead()
	start := s.clock.Now()
	o.JobID = job.ID
	defer func() {
		o.Err = err
		// Events and the heartbeat's last snapshot first, so whoever got
		// the reply finds them up to date.
		s.report(job, o, s.clock.Since(start))
		s.co.finish(n, o)
	}()

	plain, err := snapshot.ReadConsistent(ctx, s.sessionPath)
	if errors.Is(err, fs.ErrNotExist) {
		return o, ErrNoSession
	}
	if err != nil {
		return o, fmt.Errorf("read session store: %w", err)
	}
	sum := sha256.Sum256(plain)
	sha := hex.EncodeToString(sum[:])
	o.Ref = bus.SnapshotRef{Bytes: int64(len(plain)), SHA256: sha}

	var payload []byte
	var meta snapshot.Meta
	encode := func() error {
		if payload != nil {
			return nil
		}
		var err error
		if payload, meta, err = snapshot.Encode(plain, s.cfg.SessionEncryptionKey); err != nil {
			payload = nil
			return fmt.Errorf("encode snapshot: %w", err)
		}
		o.Stored = meta.Stored
		return nil
	}
	localUnchanged := false
	if files, _ := s.local.List(); len(files) > 0 && files[0].SHA256 == sha {
		localUnchanged = true
	}

	// Guarantee 5: check the copy itself, not the live file, so a logout
	// racing the read cannot slip an unlinked store in. When the store
	// changed, encoding runs meanwhile (it is needed anyway).
	var has bool
	var verr, eerr error
	var wg sync.WaitGroup
	wg.Go(func() { has, verr = snapshot.Verify(ctx, plain, s.cfg.DataDir) })
	if !localUnchanged {
		eerr = encode()
	}
	wg.Wait()
	if verr != nil {
		return o, fmt.Errorf("session store copy: %w", verr)
	}
	if !has {
		return o, ErrNoDevice
	}
	if eerr != nil {
		return o, eerr
	}

	// The local fallback before the database: if the database hangs or is
	// gone, the newest state is already on disk.
	now := s.clock.Now().UTC()
	var lerr error
	if !localUnchanged {
		if _, lerr = s.local.Write(payload, now, job.Reason, sha); lerr != nil {
			s.log.Warn("local fallback write failed", "err", lerr)
		}
	}
	unlockSem()
	if st == nil {
		if lerr != nil {
			return o, lerr // reported: logged and published as backup.failed
		}
		o.Ref.Unchanged = localUnchanged
		return o, nil
	}
	// A quick local check; the authoritative one is inside the insert
	// transaction (the lease row must be ours and unexpired).
	if !s.holdsLease() {
		return o, ErrLeaseLost
	}
	lctx, lcancel := withTimeout(ctx, s.clock, dbCallTimeout)
	latest, err := Latest(lctx, st, s.cfg.SessionID)
	lcancel()
	if err != nil {
		s.noteDB(false)
		return o, fmt.Errorf("database: %w", err)
	}
	if latest != nil && latest.SHA256 == sha {
		o.Ref.ID, o.Ref.Unchanged, o.Stored = latest.ID, true, latest.StoredBytes
		s.noteDB(true)
		return o, nil
	}
	if err := encode(); err != nil {
		return o, err
	}
	ictx, icancel := withTimeout(ctx, s.clock, insertTimeout(len(payload)))
	id, err := st.InsertSnapshot(ictx, NewSnapshot{SessionID: s.cfg.SessionID, CreatedAt: now, Reason: job.Reason,
		SHA256: sha, SizeBytes: meta.Size, StoredBytes: meta.Stored, Format: meta.Format, Payload: payload,
		LeaseHolder: s.opts.Instance, LeaseNow: s.clock.Now()}, complete)
	icancel()
	if errors.Is(err, ErrLeaseLost) {
		// Not stored. Whether another instance has the lease (standby) or
		// ours merely expired (renewed again) is the renewal loop's call.
		s.noteDB(true)
		return o, ErrLeaseLost
	}
	if err != nil {
		s.noteDB(false)
		return o, err
	}
	s.noteDB(true)
	o.Ref.ID = id
	pctx, pcancel := withTimeout(ctx, s.clock, dbCallTimeout)
	defer pcancel()
	if n, err := st.Prune(pctx, s.cfg.SessionID, s.cfg.BackupRetention); err != nil {
		s.log.Warn("prune snapshots failed", "err", err)
	} else if n > 0 {
		s.log.Debug("pruned snapshots", "deleted", n)
	}
	return o, nil
}

func (s *Service) report(job JobInfo, o outcome, d time.Duration) {
	now := s.clock.Now()
	if o.Err != nil {
		if errors.Is(o.Err, ErrNoDevice) || errors.Is(o.Err, ErrNoSession) {
			s.log.Info("snapshot skipped", "reason", job.Reason, "why", o.Err)
			return
		}
		s.noteErr(o.Err)
		s.log.Warn("snapshot failed", "reason", job.Reason, "attempt", job.Attempt, "err", o.Err)
		ev := bus.BackupFailed{Reason: job.Reason, Error: o.Err.Error(), Attempt: job.Attempt}
		ev.Stamp(s.cfg.SessionID, now)
		_ = bus.Publish(s.opts.NC, s.subj.BackupFailed(), ev)
		return
	}
	s.mu.Lock()
	ref := o.Ref
	s.lastSnap, s.lastSnapAt = &ref, &now
	s.mu.Unlock()
	s.log.Info("snapshot done", "reason", job.Reason, "id", o.Ref.ID, "bytes", o.Ref.Bytes, "unchanged", o.Ref.Unchanged,
		"duration", d, "job_id", job.ID)
	ev := bus.BackupDone{SnapshotID: o.Ref.ID, Reason: job.Reason, Bytes: o.Ref.Bytes, StoredBytes: o.Stored,
		SHA256: o.Ref.SHA256, DurationMS: d.Milliseconds(), Unchanged: o.Ref.Unchanged, JobID: job.ID}
	ev.Stamp(s.cfg.SessionID, now)
	_ = bus.Publish(s.opts.NC, s.subj.BackupDone(), ev)
}

// holdsLease is false once the lease may have expired: renewals that kept
// failing (database down) leave it to whoever takes it next.
func (s *Service) holdsLease() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaseHeldLocked()
}

func (s *Service) leaseHeldLocked() bool {
	return s.leaseHeld && s.clock.Now().Before(s.leaseUntil)
}

func (s *Service) noteDB(ok bool) {
	s.mu.Lock()
	s.dbOK = ok
	s.mu.Unlock()
	s.setState()
}

func (s *Service) noteErr(err error) {
	now := s.clock.Now().UTC()
	s.mu.Lock()
	s.lastErr, s.lastErrAt = err.Error(), &now
	s.mu.Unlock()
}

// setState derives the heartbeat state, unless standby or stopping.
func (s *Service) setState() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == bus.StateStopping {
		return
	}
	if !s.epoch.done {
		return // starting or standby until restore is done
	}
	if s.store == nil || !s.dbOK || !s.leaseHeldLocked() || !s.epoch.reply.OK {
		s.state = bus.StateDegraded
	} else {
		s.state = bus.StateOK
	}
}

func (s *Service) beat() (string, any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := bus.BackupDetails{DatabaseOK: s.dbOK && s.store != nil, LeaseHeld: s.leaseHeldLocked(), LastError: s.lastErr, LastErrorAt: s.lastErrAt}
	if s.store != nil {
		d.Database = s.store.Kind()
	} else if s.cfg.DatabaseURL != "" {
		d.Database = "postgres"
	} else {
		d.Database = "sqlite"
	}
	if s.lastSnap != nil {
		d.LastSnapshotID, d.LastSnapshotAt, d.LastSnapshotBytes = s.lastSnap.ID, s.lastSnapAt, s.lastSnap.Bytes
	}
	return s.state, d
}

// shutdown takes the shutdown snapshot (a River job, awaited; the local
// fallback when the database is gone), stops River and releases the lease,
// all before one deadline: 70% of SHUTDOWN_TIMEOUT from now (the gateway has
// used some of it already).
func (s *Service) shutdown(bgCancel context.CancelFunc) {
	s.mu.Lock()
	s.state = bus.StateStopping
	s.mu.Unlock()
	budget := s.cfg.ShutdownTimeout * 7 / 10
	ctx, cancel := withTimeout(context.Background(), s.clock, budget)
	defer cancel()

	// Background loops first: reconnect must not swap the store under us.
	bgCancel()
	s.bgWG.Wait()

	st, q := s.backend()
	s.mu.Lock()
	restored := s.epoch.done && s.epoch.reply.OK
	s.mu.Unlock()
	saved := false
	if restored {
		saved = s.shutdownSnapshot(ctx, q, budget*55/100)
	}
	if q != nil {
		sctx, scancel := withTimeout(ctx, s.clock, budget*15/100)
		if err := q.Stop(sctx); err != nil {
			s.log.Warn("river stop", "err", err)
		}
		scancel()
	}
	if st != nil {
		if saved {
			s.release(ctx, st)
		} else {
			s.log.Warn("shutdown snapshot not in the database; the lease is left to expire", "ttl", s.opts.LeaseTTL)
		}
		st.Close()
	}
}

// shutdownSnapshot returns whether the session is safe in the database (a
// new or unchanged snapshot, or nothing worth storing).
func (s *Service) shutdownSnapshot(ctx context.Context, q Queue, wait time.Duration) bool {
	if q != nil {
		w, gen, _ := s.co.add(bus.ReasonShutdown, true)
		// Always insert: a pending shutdown job from conn.stopped may have
		// read the store before the gateway's last writes.
		ectx, cancel := withTimeout(ctx, s.clock, wait)
		defer cancel()
		if _, err := q.Enqueue(ectx, bus.ReasonShutdown, gen); err == nil {
			select {
			case o := <-w.ch:
				if o.Err == nil || errors.Is(o.Err, ErrNoDevice) || errors.Is(o.Err, ErrNoSession) {
					return o.Err == nil && o.Ref.ID != 0 || o.Err != nil
				}
				s.log.Warn("shutdown snapshot failed; writing the local fallback", "err", o.Err)
			case <-ectx.Done():
				s.co.remove(w)
				s.log.Warn("shutdown snapshot not done in time; writing the local fallback")
			}
		} else {
			s.co.remove(w)
			s.log.Warn("shutdown snapshot not queued; writing the local fallback", "err", err)
		}
	}
	if _, err := s.snapshot(ctx, JobInfo{Reason: bus.ReasonShutdown, Attempt: 1, MaxAttempts: 1}, nil, nil); err != nil &&
		!errors.Is(err, ErrNoDevice) && !errors.Is(err, ErrNoSession) {
		s.log.Error("shutdown snapshot to the local fallback failed", "err", err)
	}
	return false
}

// release frees the lease, within ctx (the shutdown's deadline) and at most
// releaseTimeout.
func (s *Service) release(ctx context.Context, st Store) {
	ctx, cancel := withTimeout(ctx, s.clock, releaseTimeout)
	defer cancel()
	if err := st.ReleaseLease(ctx, s.cfg.SessionID, s.opts.Instance); err != nil {
		s.log.Warn("lease release failed; it expires by itself", "err", err)
		return
	}
	s.mu.Lock()
	s.leaseHeld = false
	s.mu.Unlock()
	s.log.Info("session lease released")
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

// withTimeout is context.WithTimeout on the injected clock. (clockwork's own
// WithTimeout has an Err that blocks until the deadline, which breaks every
// library that polls ctx.Err().)
func withTimeout(parent context.Context, clock clockwork.Clock, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	t := clock.AfterFunc(d, func() { cancel(context.DeadlineExceeded) })
	return ctx, func() {
		t.Stop()
		cancel(context.Canceled)
	}
}

func nonce() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
