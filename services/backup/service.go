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
	ErrLeaseLost = errors.New("not stored: this instance no longer holds the session lease")
	ErrStopping  = errors.New("backup service is stopping")
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

	ready     chan struct{} // closed once restore on start is done
	restore   bus.RestoreReply
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
	leaseUntil time.Time // our lease's expiry as last written
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
		ready:       make(chan struct{}),
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
func (s *Service) Run(ctx context.Context) error {
	s.startedAt = s.clock.Now()
	if err := os.MkdirAll(s.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("backup: DATA_DIR: %w", err)
	}
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
		s.handlers.Wait()
	}()

	store := s.openStore(ctx)
	if store != nil {
		if err := s.acquireLease(ctx, store); err != nil {
			if ctx.Err() != nil { // stopped while in standby: nothing of ours to save
				store.Close()
				return nil
			}
			s.log.Warn("database failed while taking the lease; continuing degraded", "err", err)
			store.Close()
			store = nil
		}
	}
	if ctx.Err() != nil {
		if store != nil {
			s.release(store)
			store.Close()
		}
		return nil
	}

	s.restoreOnStart(ctx, store)

	if store != nil {
		if err := s.startQueue(store); err != nil {
			s.log.Error("river did not start; continuing degraded", "err", err)
			s.release(store)
			store.Close()
			store = nil
		}
	}
	if store == nil {
		s.setDB(nil, nil, false)
		s.bgWG.Go(func() { s.reconnect(bg) })
	} else {
		s.bgWG.Go(func() { s.renewLoop(bg) })
	}

	var subs []*nats.Subscription
	for subj, h := range map[string]nats.MsgHandler{
		s.subj.BackupRequest():       s.onBackupRequest,
		s.subj.Conn(bus.ConnPaired):  func(*nats.Msg) { s.request(bus.ReasonPaired, nil) },
		s.subj.Conn(bus.ConnStopped): func(*nats.Msg) { s.request(bus.ReasonShutdown, nil) },
	} {
		sub, err := s.opts.NC.Subscribe(subj, h)
		if err != nil {
			return fmt.Errorf("backup: subscribe %s: %w", subj, err)
		}
		subs = append(subs, sub)
	}
	// Answer P.session.restore only now: once the gateway hears back, it may
	// ask for snapshots at once.
	close(s.ready)
	s.setState()

	<-ctx.Done()
	for _, sub := range subs {
		_ = sub.Unsubscribe()
	}
	s.shutdown(bgCancel)
	return nil
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
// holder has it, it is standby.
func (s *Service) acquireLease(ctx context.Context, st Store) error {
	retry := s.opts.StandbyRetry
	announced := false
	for {
		lease, ok, err := st.AcquireLease(ctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		if err != nil {
			return err
		}
		if ok {
			s.mu.Lock()
			s.leaseHeld, s.dbOK, s.leaseUntil = true, true, lease.ExpiresAt
			s.mu.Unlock()
			s.log.Info("session lease held", "ttl", s.opts.LeaseTTL)
			return nil
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
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.clock.After(retry):
		}
	}
}

// renewLoop renews the lease every TTL/3 on the injected clock.
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
		lease, ok, err := st.AcquireLease(ctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		s.dbOK = err == nil
		wasHeld := s.leaseHeld
		if err == nil {
			s.leaseHeld = ok
			if ok {
				s.leaseUntil = lease.ExpiresAt
			}
		}
		s.mu.Unlock()
		switch {
		case err != nil:
			s.noteErr(fmt.Errorf("renew lease: %w", err))
			s.log.Warn("lease renewal failed", "err", err)
		case !ok && wasHeld:
			s.noteErr(errors.New("session lease lost to " + lease.Holder))
			s.log.Error("session lease lost: another instance took it; snapshots to the database stop", "holder", lease.Holder)
		case ok && !wasHeld:
			s.log.Info("session lease held again")
		}
		s.setState()
	}
}

// reconnect runs while degraded: once the database answers, it takes the
// lease, starts River and stores a fresh snapshot there (guarantee 4).
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
		lease, ok, err := st.AcquireLease(ctx, s.cfg.SessionID, s.opts.Instance, s.clock.Now(), s.opts.LeaseTTL)
		if err != nil || !ok {
			if err == nil {
				err = errors.New("session lease held by " + lease.Holder)
			}
			s.log.Error("database back but the lease is not ours; staying on the local fallback", "err", err)
			s.noteErr(err)
			st.Close()
			continue
		}
		s.mu.Lock()
		s.leaseHeld, s.leaseUntil = true, lease.ExpiresAt
		s.mu.Unlock()
		if err := s.startQueue(st); err != nil {
			s.noteErr(err)
			s.release(st)
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
		TmpDir: s.cfg.DataDir, Key: s.cfg.SessionEncryptionKey, Log: s.log}
}

// restoreOnStart restores if needed and opens the P.session.restore answers.
func (s *Service) restoreOnStart(ctx context.Context, st Store) {
	res, err := s.restorer(st).RestoreOnStart(ctx)
	if err != nil && st != nil && !errors.Is(err, ErrKey) {
		// The database failed mid-restore: the local fallback may still do.
		s.log.Warn("restore from the database failed; trying the local fallback", "err", err)
		res, err = s.restorer(nil).RestoreOnStart(ctx)
	}
	if err != nil {
		s.log.Error("restore failed; the session store was left as it was", "err", err)
		s.noteErr(err)
		s.restore = bus.RestoreReply{OK: false, Error: err.Error()}
		return
	}
	s.restore = bus.RestoreReply{OK: true, Restored: res.Restored, Source: res.Source, SnapshotID: res.SnapshotID}
	s.log.Info("session store ready", "restored", res.Restored, "source", res.Source, "snapshot_id", res.SnapshotID)
}

// onRestore answers P.session.restore once restore on start is done.
func (s *Service) onRestore(m *nats.Msg) {
	if m.Reply == "" {
		return
	}
	s.spawn(func() {
		select {
		case <-s.ready:
			_ = bus.Respond(m, s.restore)
		case <-s.stopping:
			_ = bus.Respond(m, bus.RestoreReply{OK: false, Error: ErrStopping.Error()})
		}
	})
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
	if errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoSession) {
		return nil // nothing to store is not a failure to retry
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
	defer func() { <-s.snapSem }()
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
	if !localUnchanged {
		if _, err := s.local.Write(payload, now, job.Reason, sha); err != nil {
			s.log.Warn("local fallback write failed", "err", err)
		}
	}
	if st == nil {
		o.Ref.Unchanged = localUnchanged
		return o, nil
	}
	if !s.holdsLease() {
		return o, ErrLeaseLost
	}
	latest, err := st.Latest(ctx, s.cfg.SessionID)
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
	id, err := st.InsertSnapshot(ctx, NewSnapshot{SessionID: s.cfg.SessionID, CreatedAt: now, Reason: job.Reason,
		SHA256: sha, SizeBytes: meta.Size, StoredBytes: meta.Stored, Format: meta.Format, Payload: payload}, complete)
	if err != nil {
		s.noteDB(false)
		return o, err
	}
	s.noteDB(true)
	o.Ref.ID = id
	if n, err := st.Prune(ctx, s.cfg.SessionID, s.cfg.BackupRetention); err != nil {
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
	select {
	case <-s.ready:
	default:
		return // starting or standby until restore is done
	}
	if s.store == nil || !s.dbOK || !s.leaseHeldLocked() || !s.restore.OK {
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
// within 70% of SHUTDOWN_TIMEOUT: the gateway has used some of it already.
func (s *Service) shutdown(bgCancel context.CancelFunc) {
	s.mu.Lock()
	s.state = bus.StateStopping
	s.mu.Unlock()
	budget := s.cfg.ShutdownTimeout * 7 / 10
	ctx, cancel := withTimeout(context.Background(), s.clock, budget)
	defer cancel()

	st, q := s.backend()
	saved := false
	if s.restore.OK {
		saved = s.shutdownSnapshot(ctx, q, budget*6/10)
	}
	if q != nil {
		sctx, scancel := withTimeout(ctx, s.clock, budget*2/10)
		if err := q.Stop(sctx); err != nil {
			s.log.Warn("river stop", "err", err)
		}
		scancel()
	}
	bgCancel()
	s.bgWG.Wait()
	if st != nil {
		if saved {
			s.release(st)
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
	_, _ = s.snapshot(ctx, JobInfo{Reason: bus.ReasonShutdown, Attempt: 1, MaxAttempts: 1}, nil, nil)
	return false
}

func (s *Service) release(st Store) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
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
