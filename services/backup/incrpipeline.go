package backup

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
)

// ReasonSync records a point taken because the store changed (continuous
// replication); ReasonCompaction one taken because a new base was due;
// ReasonCatchUp the base that brings the database up to date with the local
// fallback once the database answers again (Ship).
const (
	ReasonSync       = "sync"
	ReasonCompaction = "compaction"
	ReasonCatchUp    = "catch-up"
)

// IncrementalConfig configures Incremental.
type IncrementalConfig struct {
	Session     string
	Holder      string // the lease holder a database insert is conditional on
	SessionPath string
	Key         []byte // nil: plaintext
	Local       LocalPoints
	Policy      incr.Policy
	// Retention also runs right after a point when it may delete
	// something (see retainIfDue); zero: only when Retain is called.
	Retention Retention
	Clock     clockwork.Clock
	Log       *slog.Logger
	// Lease says whether this process holds the session lease and under
	// which generation (the insert's transaction checks both again).
	Lease interface {
		Held() bool
		Generation() int64
	}
	Database func(ok bool)
	Report   func(job JobInfo, o Outcome, took time.Duration)
}

// Incremental is the continuous-replication Pipeline (SYNC_INTERVAL > 0):
// every point is a base or a delta of package incr, stored with its new
// pieces in one catalog transaction with its River job's completion, or in
// the local fallback (LocalPoints) while the database does not answer.
//
// Chains: a process starts a fresh base at its first point (its chain is
// then one it read itself, never one whose pieces it did not see stored),
// and after that takes deltas on its last recorded point until
// Policy.BaseDue says a new base is due (compaction). A point that goes
// elsewhere than the chain (the database failed: the local fallback; it
// answers again: the database) starts with a base there too, so each store
// holds whole chains. Points of one generation carry increasing sequence
// numbers, continuing those already stored under it.
type Incremental struct {
	cfg      IncrementalConfig
	co       *coalescer
	sem      chan struct{} // one capture (or retention) at a time
	shipping atomic.Bool
	checker  switchChecker

	// Under sem:
	cap     *incr.Capturer
	capFile os.FileInfo
	chain   []incr.Manifest // the chain of the last recorded point, base first
	where   string          // where chain is: bus.StoredDatabase or bus.StoredLocal
	lastID  int64           // the catalog id of chain's last point (database)
	seqGen  int64           // the generation seq counts in
	seq     uint64          // the last sequence number used in seqGen (0: look it up)
	// When retention may next delete without a new base (planRetention):
	// after retainAfter more database points, or at retainAt.
	retainAfter, sinceRetain int
	retainAt                 time.Time

	mu        sync.Mutex
	unshipped bool
	watch     *incr.Watcher
	stats     replicationStats
}

// replicationStats is what the heartbeat and the minute's summary say.
type replicationStats struct {
	points, bases  int64 // taken by this process (for the summary)
	bytes          int64 // stored by this process
	catalog        PointStats
	catalogKnown   bool
	lastPoint      *time.Time
	lastBase       *time.Time
	lastCompaction *time.Time
	generation     int64
}

var _ Pipeline = (*Incremental)(nil)

// NewIncremental builds the pipeline; the capturer opens at the first point.
func NewIncremental(cfg IncrementalConfig) *Incremental {
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
	return &Incremental{cfg: cfg, co: newCoalescer(), sem: make(chan struct{}, 1)}
}

// Want registers a request (see Pipeline).
func (p *Incremental) Want(reason string, reply bool) (*Wait, int64, bool) {
	return p.co.add(reason, reply)
}

// Requeue forgets the queued runs.
func (p *Incremental) Requeue() { p.co.requeue() }

// Unshipped reports points in the local fallback only.
func (p *Incremental) Unshipped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.unshipped
}

// Disown forgets the chain and the local fallback: another instance's store
// replaces ours. The capturer closes (the file is about to be replaced).
func (p *Incremental) Disown() {
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	p.closeCapturer()
	p.chain, p.where, p.lastID, p.seq = nil, "", 0, 0
	if err := p.cfg.Local.Clear(); err != nil {
		p.cfg.Log.Warn("local fallback: cannot clear it", "err", err)
	}
	p.mu.Lock()
	p.unshipped = false
	p.mu.Unlock()
}

// Close releases the capturer.
func (p *Incremental) Close() error {
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	p.closeCapturer()
	return nil
}

func (p *Incremental) closeCapturer() {
	if p.cap != nil {
		_ = p.cap.Close()
		p.cap, p.capFile = nil, nil
	}
}

// Ship stores the session in cat now when the newest point is in the local
// fallback only: a fresh base there (its regions that did not change since
// the database's last base are stored once, by content), after which the
// fallback is emptied.
func (p *Incremental) Ship(ctx context.Context, cat Catalog) (Outcome, bool, error) {
	if cat == nil || !p.Unshipped() || !p.shipping.CompareAndSwap(false, true) {
		return Outcome{}, false, nil
	}
	defer p.shipping.Store(false)
	o, err := p.Point(ctx, Run{Job: JobInfo{Reason: ReasonCatchUp, Attempt: 1, MaxAttempts: 1}, Catalog: cat})
	return o, true, err
}

// Point takes one point for run (see Pipeline): a delta on the last
// recorded point, or a base when none is known, the point goes elsewhere
// than its chain, or one is due. A compaction run takes a point only when
// a base is due.
func (p *Incremental) Point(ctx context.Context, run Run) (o Outcome, err error) {
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return o, fmt.Errorf("point: %w", ctx.Err())
	}
	defer func() { <-p.sem }()
	target := bus.StoredDatabase
	pts, _ := run.Catalog.(Points)
	if run.Catalog == nil || pts == nil {
		target = bus.StoredLocal
	}
	now := p.cfg.Clock.Now()
	due, why := p.cfg.Policy.BaseDue(p.chain, now)
	if run.Job.Reason == ReasonCompaction && (!due || p.where != target) {
		return Outcome{JobID: run.Job.ID, Ref: p.lastRef(), Where: p.where}, nil // nothing due: no capture
	}
	n := p.co.beginRead()
	o.JobID = run.Job.ID
	var mark incr.Mark
	watch := p.watcher()
	if watch != nil {
		mark = watch.Shipping()
	}
	defer func() {
		o.Err = err
		if err == nil && watch != nil && o.Where == bus.StoredDatabase {
			watch.Shipped(mark)
		}
		p.cfg.Report(run.Job, o, p.cfg.Clock.Since(now))
		p.co.finish(n, o)
	}()
	if err := p.open(ctx); err != nil {
		return o, err
	}
	if target == bus.StoredDatabase && !p.cfg.Lease.Held() {
		return o, ErrLeaseLost
	}
	gen := p.cfg.Lease.Generation()
	base := len(p.chain) == 0 || p.where != target || due
	if p.where != target && len(p.chain) > 0 {
		why = "the chain is in the " + p.where + " store"
	}
	pt, err := p.capture(ctx, run, target, pts, gen, base)
	if errors.Is(err, incr.ErrNoChange) {
		o.Ref, o.Where = p.lastRef(), p.where
		o.Ref.Unchanged = true
		return o, nil
	}
	if err != nil {
		return o, err
	}
	if pt.Manifest.Kind == incr.KindBase && len(p.chain) > 0 && due {
		// Debug: under churn a base is due every few points; the minute's
		// summary counts them.
		p.cfg.Log.Debug("incremental backup: new base", "why", why)
	}
	return p.record(ctx, run, target, pts, pt, due && len(p.chain) > 0)
}

// open opens the capturer on the store, again when the file was replaced
// (a restore renames a new one into place).
func (p *Incremental) open(ctx context.Context) error {
	fi, err := os.Stat(p.cfg.SessionPath)
	if errors.Is(err, fs.ErrNotExist) {
		p.closeCapturer()
		return ErrNoSession
	}
	if err != nil {
		return fmt.Errorf("session store: %w", err)
	}
	if p.cap != nil && os.SameFile(fi, p.capFile) {
		return nil
	}
	p.closeCapturer()
	p.chain, p.where = nil, "" // a new file: its first point is a base
	has, err := snapshot.HasDevice(ctx, p.cfg.SessionPath)
	if err != nil {
		return fmt.Errorf("session store: %w", err)
	}
	if !has {
		return ErrNoDevice
	}
	c, err := incr.Open(ctx, p.cfg.SessionPath, incr.Options{Key: p.cfg.Key, Pieces: &p.checker, Log: p.cfg.Log, Clock: p.cfg.Clock})
	if err != nil {
		return fmt.Errorf("session store: %w", err)
	}
	p.cap, p.capFile = c, fi
	return nil
}

// capture takes the point: the checker answers for target's pieces.
func (p *Incremental) capture(ctx context.Context, run Run, target string, pts Points, gen int64, base bool) (*incr.Point, error) {
	if target == bus.StoredDatabase {
		p.checker.to = catalogPieces{cat: pts, session: p.cfg.Session}
	} else {
		ps, err := p.cfg.Local.Pieces()
		if err != nil {
			return nil, fmt.Errorf("local fallback: %w", err)
		}
		p.checker.to = ps
	}
	seq, err := p.nextSeq(ctx, target, pts, gen)
	if err != nil {
		return nil, err
	}
	if !base {
		pt, err := p.cap.Delta(ctx, p.chain[len(p.chain)-1], gen)
		if !errors.Is(err, incr.ErrUnknownParent) {
			if err == nil {
				p.seq = seq
			}
			return pt, err
		}
	}
	pt, err := p.cap.Base(ctx, gen, seq)
	if err == nil {
		p.seq = seq
	}
	return pt, err
}

// nextSeq is the sequence number of the next point of gen: one above the
// last this process used, or above the newest stored under gen (a process
// of the same holder name may have written under it before a restart).
func (p *Incremental) nextSeq(ctx context.Context, target string, pts Points, gen int64) (uint64, error) {
	if p.seqGen != gen {
		p.seqGen, p.seq = gen, 0
	}
	if p.seq > 0 {
		return p.seq + 1, nil
	}
	var last uint64
	if locals, err := p.cfg.Local.List(); err == nil {
		for _, l := range locals {
			if l.Generation == gen {
				last = max(last, l.Seq)
			}
		}
	}
	if target == bus.StoredDatabase {
		cctx, cancel := clockctx.WithTimeout(ctx, p.cfg.Clock, dbCallTimeout)
		list, err := pts.ListPoints(cctx, p.cfg.Session, 1)
		cancel()
		if err != nil {
			p.cfg.Database(false)
			return 0, fmt.Errorf("database: %w", err)
		}
		if len(list) > 0 && list[0].Generation == gen {
			last = max(last, uint64(list[0].Seq))
		}
	}
	return last + 1, nil
}

// record stores pt in target: the catalog in run's transaction, or the
// local fallback. A database failure keeps the state in the local fallback
// instead, as a base there.
func (p *Incremental) record(ctx context.Context, run Run, target string, pts Points, pt *incr.Point, compaction bool) (Outcome, error) {
	o := Outcome{JobID: run.Job.ID}
	if target == bus.StoredDatabase {
		np := newPoint(p.cfg.Session, run.Job.Reason, pt)
		np.LeaseHolder, np.LeaseNow = p.cfg.Holder, p.cfg.Clock.Now()
		ictx, cancel := clockctx.WithTimeout(ctx, p.cfg.Clock, insertTimeout(int(pt.StoredBytes())))
		id, err := pts.InsertPoint(ictx, np, run.InTx)
		cancel()
		switch {
		case errors.Is(err, ErrLeaseLost):
			p.cfg.Database(true)
			return o, ErrLeaseLost
		case err != nil && ctx.Err() != nil:
			return o, err
		case err != nil:
			p.cfg.Database(false)
			p.cfg.Log.Warn("incremental backup: database insert failed; the point goes to the local fallback", "err", err)
			return p.fallback(ctx, run, err)
		}
		p.cfg.Database(true)
		if p.where == bus.StoredLocal {
			if err := p.cfg.Local.Clear(); err != nil {
				p.cfg.Log.Warn("local fallback: cannot clear it", "err", err)
			}
			p.mu.Lock()
			p.unshipped = false
			p.mu.Unlock()
		}
		p.adopt(pt, bus.StoredDatabase, id, compaction)
		o.Ref, o.Stored, o.Where = p.lastRef(), pt.StoredBytes(), bus.StoredDatabase
		p.retainIfDue(ctx, pts, pt.Manifest.Kind == incr.KindBase)
		return o, nil
	}
	if err := p.cfg.Local.Put(ctx, pt); err != nil {
		return o, err
	}
	p.adopt(pt, bus.StoredLocal, 0, compaction)
	if pt.Manifest.Kind == incr.KindBase {
		if err := p.cfg.Local.Keep(p.chain); err != nil {
			p.cfg.Log.Warn("local fallback: cannot drop older chains", "err", err)
		}
	}
	p.mu.Lock()
	p.unshipped = true
	p.mu.Unlock()
	o.Ref, o.Stored, o.Where = p.lastRef(), pt.StoredBytes(), bus.StoredLocal
	return o, nil
}

// fallback keeps the store in the local fallback after a failed database
// insert: a base there, the local chain's start.
func (p *Incremental) fallback(ctx context.Context, run Run, dbErr error) (Outcome, error) {
	gen := p.cfg.Lease.Generation()
	pt, err := p.capture(ctx, run, bus.StoredLocal, nil, gen, true)
	if err != nil {
		return Outcome{JobID: run.Job.ID}, errors.Join(dbErr, err)
	}
	return p.record(ctx, run, bus.StoredLocal, nil, pt, false)
}

// adopt makes pt the chain's last point.
func (p *Incremental) adopt(pt *incr.Point, where string, id int64, compaction bool) {
	m := pt.Manifest
	if m.Kind == incr.KindBase {
		p.chain = p.chain[:0:0]
	}
	p.chain = append(p.chain, m)
	p.where, p.lastID = where, id
	at := m.Created
	p.mu.Lock()
	defer p.mu.Unlock()
	s := &p.stats
	s.points++
	s.bytes += pt.StoredBytes()
	s.lastPoint, s.generation = &at, m.Generation
	if m.Kind == incr.KindBase {
		s.bases++
		s.lastBase = &at
		if compaction {
			s.lastCompaction = &at
		}
	}
	if where == bus.StoredDatabase && s.catalogKnown {
		s.catalog.Points++
		s.catalog.ManifestBytes += int64(len(pt.Sealed))
		for _, pc := range pt.Pieces {
			s.catalog.Pieces++
			s.catalog.PieceBytes += int64(len(pc.Data))
		}
	}
}

// lastRef describes the chain's last point as a reply's snapshot.
func (p *Incremental) lastRef() bus.SnapshotRef {
	if len(p.chain) == 0 {
		return bus.SnapshotRef{}
	}
	m := p.chain[len(p.chain)-1]
	return bus.SnapshotRef{ID: p.lastID, Bytes: int64(m.PageSize) * int64(m.PageCount), SHA256: m.DBHash.String()}
}
