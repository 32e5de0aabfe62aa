package backup

import (
	"context"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// Pipeline turns the session store into stored points. The Service asks it
// for a point covering now, for a reason, and hears back what was stored and
// where. Snapshots (a full bsnap/1 snapshot per point) is today's pipeline;
// a chunked or incremental one implements the same interface to replace it
// or to sit beside it.
//
// Coverage: a point covers every request registered (Want) before the point
// reads the store. Points run one at a time, so they end in read order.
type Pipeline interface {
	// Want registers a request for a point covering now. w (nil unless
	// reply) receives the Outcome of the first point that covers it. queue
	// says no queued run covers it yet: the caller queues one for gen (a
	// River job unique by gen), or runs Point itself.
	Want(reason string, reply bool) (w *Wait, gen int64, queue bool)
	// Point takes one point for run and answers the requests it covers.
	Point(ctx context.Context, run Run) (Outcome, error)
	// Ship stores a point in cat now when the newest one reached the local
	// fallback only (the database answers again); ran is false when there
	// was nothing to ship or a Ship runs already.
	Ship(ctx context.Context, cat Catalog) (o Outcome, ran bool, err error)
	// Unshipped reports that the newest point reached the local fallback
	// only.
	Unshipped() bool
	// Requeue forgets the queued runs (their queue is gone): the next Want
	// queues anew.
	Requeue()
	// Disown forgets what is unshipped: another instance's store replaces
	// ours.
	Disown()
	// Close releases what the pipeline holds open on the store.
	Close() error
}

// Run is one point to take.
type Run struct {
	Job JobInfo // the River job it runs in (ID 0: outside River); Job.Reason is recorded
	// Catalog is where the point goes besides the local fallback; nil:
	// the local fallback only (the database is unreachable).
	Catalog Catalog
	// InTx runs in the transaction that stores the point (the job's
	// completion); nil: none.
	InTx InTx
}

// Outcome is what one point produced, handed to the requests it covers.
type Outcome struct {
	Ref    bus.SnapshotRef
	Stored int64  // bytes stored
	Where  string // bus.StoredDatabase or bus.StoredLocal: where the point is kept
	JobID  int64
	Err    error
}

// Wait is one registered request's answer.
type Wait struct {
	after  int64
	ch     chan Outcome // buffered 1
	cancel func()
}

// Cancel forgets a request that gave up (timeout or shutdown).
func (w *Wait) Cancel() { w.cancel() }

// Done receives the Outcome of the point that covers the request, once.
func (w *Wait) Done() <-chan Outcome { return w.ch }
