package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
)

// SnapshotsConfig configures Snapshots.
type SnapshotsConfig struct {
	Session     string
	Holder      string // the lease holder a database insert is conditional on
	SessionPath string // the store to snapshot
	TmpDir      string // where a copy is checked (same disk as the store)
	Key         []byte // nil: plaintext
	Local       Local
	Retention   Retention // database snapshots kept per session
	Clock       clockwork.Clock
	Log         *slog.Logger
	// Lease says whether this process holds the session lease (a quick
	// check; the insert's transaction holds the authoritative one).
	Lease interface{ Held() bool }
	// Database hears each database call's outcome (false: it failed).
	Database func(ok bool)
	// Report runs once a point ends, before the requests it covers are
	// answered, so whoever gets the reply finds events and status up to date.
	Report func(job JobInfo, o Outcome, took time.Duration)
}

// Snapshots is the full-snapshot Pipeline: every point is one consistent
// copy of the store, checked for a linked device, encoded (compressed,
// encrypted) once, written to the local fallback first and then inserted in
// the database in the transaction that completes its River job, unless the
// database's newest snapshot already holds the same store.
type Snapshots struct {
	cfg      SnapshotsConfig
	co       *coalescer
	sem      chan struct{} // one point at a time, River or direct
	shipping atomic.Bool   // a Ship runs
	mu       sync.Mutex
	// unshippedRead is the read number of the newest point that reached the
	// local fallback only (0: none): the database needs it once back.
	unshippedRead int64
}

var _ Pipeline = (*Snapshots)(nil)

// NewSnapshots builds the pipeline.
func NewSnapshots(cfg SnapshotsConfig) *Snapshots {
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Database == nil {
		cfg.Database = func(bool) {}
	}
	if cfg.Report == nil {
		cfg.Report = func(JobInfo, Outcome, time.Duration) {}
	}
	return &Snapshots{cfg: cfg, co: newCoalescer(), sem: make(chan struct{}, 1)}
}

// Want registers a request (see Pipeline).
func (p *Snapshots) Want(reason string, reply bool) (*Wait, int64, bool) {
	return p.co.add(reason, reply)
}

// Requeue forgets the queued runs.
func (p *Snapshots) Requeue() { p.co.requeue() }

// Disown forgets the unshipped point.
func (p *Snapshots) Disown() {
	p.mu.Lock()
	p.unshippedRead = 0
	p.mu.Unlock()
}

// Close does nothing: a snapshot holds nothing open between points.
func (p *Snapshots) Close() error { return nil }

// Unshipped reports a point in the local fallback only.
func (p *Snapshots) Unshipped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.unshippedRead > 0
}

// Ship stores the session in cat now, outside River (its jobs may sit
// behind retries), when a point reached the local fallback only: the
// database answers again, and a kill now must not lose that point.
func (p *Snapshots) Ship(ctx context.Context, cat Catalog) (Outcome, bool, error) {
	if cat == nil || !p.Unshipped() || !p.shipping.CompareAndSwap(false, true) {
		return Outcome{}, false, nil
	}
	defer p.shipping.Store(false)
	o, err := p.Point(ctx, Run{Job: JobInfo{Reason: bus.ReasonScheduled, Attempt: 1, MaxAttempts: 1}, Catalog: cat})
	return o, true, err
}

// Point takes one snapshot: consistent copy, device check, sha256, encode,
// local fallback, then the database row in the same transaction as run.InTx
// (run.Catalog nil: local only). It reports and answers the requests it
// covers.
func (p *Snapshots) Point(ctx context.Context, run Run) (o Outcome, err error) {
	select {
	case p.sem <- struct{}{}:
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
			<-p.sem
		}
	}
	defer unlockSem()
	n := p.co.beginRead()
	start := p.cfg.Clock.Now()
	o.JobID = run.Job.ID
	defer func() {
		o.Err = err
		p.trackShipped(n, o)
		p.cfg.Report(run.Job, o, p.cfg.Clock.Since(start))
		p.co.finish(n, o)
	}()
	plain, sha, err := p.read(ctx)
	if err != nil {
		return o, err
	}
	o.Ref = bus.SnapshotRef{Bytes: int64(len(plain)), SHA256: sha}

	var payload []byte
	var meta snapshot.Meta
	encode := func() error {
		if payload != nil {
			return nil
		}
		var err error
		if payload, meta, err = snapshot.Encode(plain, p.cfg.Key); err != nil {
			payload = nil
			return fmt.Errorf("encode snapshot: %w", err)
		}
		o.Stored = meta.Stored
		return nil
	}
	localUnchanged := false
	if files, _ := p.cfg.Local.List(); len(files) > 0 && files[0].SHA256 == sha {
		localUnchanged = true
	}

	// Guarantee 5: check the copy itself, not the live file, so a logout
	// racing the read cannot slip an unlinked store in. When the store
	// changed, encoding runs meanwhile (it is needed anyway).
	var has bool
	var verr, eerr error
	var wg sync.WaitGroup
	wg.Go(func() { has, verr = snapshot.Verify(ctx, plain, p.cfg.TmpDir) })
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
	now := p.cfg.Clock.Now().UTC()
	var lerr error
	if !localUnchanged {
		if _, lerr = p.cfg.Local.Write(payload, now, run.Job.Reason, sha); lerr != nil {
			p.cfg.Log.Warn("local fallback write failed", "err", lerr)
		}
	}
	if lerr == nil {
		o.Where = bus.StoredLocal
	}
	unlockSem()
	if run.Catalog == nil {
		if lerr != nil {
			return o, lerr // reported: logged and published as backup.failed
		}
		o.Ref.Unchanged = localUnchanged
		return o, nil
	}
	return p.store(ctx, run, o, sha, now, encode, func() ([]byte, snapshot.Meta) { return payload, meta })
}

// read takes the consistent copy of the store and its sha256.
func (p *Snapshots) read(ctx context.Context) ([]byte, string, error) {
	plain, err := snapshot.ReadConsistent(ctx, p.cfg.SessionPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", ErrNoSession
	}
	if err != nil {
		return nil, "", fmt.Errorf("read session store: %w", err)
	}
	sum := sha256.Sum256(plain)
	return plain, hex.EncodeToString(sum[:]), nil
}

// store puts the point in the database: nothing when its newest snapshot
// holds the same store, else one row in the transaction of run.InTx, then
// retention.
func (p *Snapshots) store(ctx context.Context, run Run, o Outcome, sha string, now time.Time,
	encode func() error, encoded func() ([]byte, snapshot.Meta)) (Outcome, error) {
	clock, cat := p.cfg.Clock, run.Catalog
	// A quick local check; the authoritative one is inside the insert
	// transaction (the lease row must be ours and unexpired).
	if !p.cfg.Lease.Held() {
		return o, ErrLeaseLost
	}
	lctx, lcancel := clockctx.WithTimeout(ctx, clock, dbCallTimeout)
	latest, err := Latest(lctx, cat, p.cfg.Session)
	lcancel()
	if err != nil {
		p.cfg.Database(false)
		return o, fmt.Errorf("database: %w", err)
	}
	if latest != nil && latest.SHA256 == sha {
		o.Ref.ID, o.Ref.Unchanged, o.Stored, o.Where = latest.ID, true, latest.StoredBytes, bus.StoredDatabase
		p.cfg.Database(true)
		return o, nil
	}
	if err := encode(); err != nil {
		return o, err
	}
	payload, meta := encoded()
	ictx, icancel := clockctx.WithTimeout(ctx, clock, insertTimeout(len(payload)))
	id, err := cat.InsertSnapshot(ictx, NewSnapshot{SessionID: p.cfg.Session, CreatedAt: now, Reason: run.Job.Reason,
		SHA256: sha, SizeBytes: meta.Size, StoredBytes: meta.Stored, Format: meta.Format, Payload: payload,
		LeaseHolder: p.cfg.Holder, LeaseNow: clock.Now()}, run.InTx)
	icancel()
	if errors.Is(err, ErrLeaseLost) {
		// Not stored. Whether another instance has the lease (standby) or
		// ours merely expired (renewed again) is the lease keeper's call.
		p.cfg.Database(true)
		return o, ErrLeaseLost
	}
	if err != nil {
		p.cfg.Database(false)
		return o, err
	}
	p.cfg.Database(true)
	o.Ref.ID, o.Where = id, bus.StoredDatabase
	pctx, pcancel := clockctx.WithTimeout(ctx, clock, dbCallTimeout)
	defer pcancel()
	if n, err := pruneSnapshots(pctx, cat, p.cfg.Session, p.cfg.Retention, clock.Now()); err != nil {
		p.cfg.Log.Warn("prune snapshots failed", "err", err)
		p.cfg.Database(false)
	} else if n > 0 {
		p.cfg.Log.Debug("pruned snapshots", "deleted", n)
	}
	return o, nil
}

// trackShipped keeps the read number of the newest point that reached the
// local fallback and not the database, and forgets it once a point read at
// or after it is in the database.
func (p *Snapshots) trackShipped(n int64, o Outcome) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch o.Where {
	case bus.StoredLocal:
		if !errors.Is(o.Err, ErrLeaseLost) {
			p.unshippedRead = max(p.unshippedRead, n)
		}
	case bus.StoredDatabase:
		if n >= p.unshippedRead {
			p.unshippedRead = 0
		}
	}
}
