package relay

import (
	"context"
	"errors"
	"sync/atomic"

	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river/riverdriver"
)

// Tx is a store transaction as relay's work sees it: an item's delivery
// jobs are inserted in the transaction that stores the item, and a send's
// job is completed (and its outcome's events inserted) in the one that
// records the outcome. Either all of it commits or none does.
type Tx interface {
	// CompleteJob completes the running River job (inside its worker only).
	jobs.Tx
	// InsertJobs inserts relay's jobs in this transaction.
	InsertJobs(ctx context.Context, list []Job) error
}

// InTx runs inside a store transaction; nothing is stored unless it
// succeeds.
type InTx func(ctx context.Context, tx Tx) error

// RefInTx runs inside the transaction that stores a message or receipt,
// once its seq (or receipt id) is known.
type RefInTx func(ctx context.Context, tx Tx, ref int64) error

// River is a store's River client for relay, typed by the store's native
// transaction (pgx.Tx, *sql.Tx): NewQueue builds it, and Tx wraps the
// store's transactions so work inside them inserts and completes jobs
// without anyone casting. A store holds one and calls both.
type River[TTx any] struct {
	q atomic.Pointer[riverQueue[TTx]]
}

// NewQueue builds relay's River client on driver through package jobs;
// the store's transactions insert jobs through it from then on (the last
// one built, if it is called again).
func (r *River[TTx]) NewQueue(driver riverdriver.Driver[TTx], cfg QueueConfig) (Queue, error) {
	q, err := newRiverQueue(driver, cfg)
	if err != nil {
		return nil, err
	}
	r.q.Store(q)
	return q, nil
}

// Tx is the store's native transaction tx as a Tx.
func (r *River[TTx]) Tx(tx TTx) Tx {
	return riverTx[TTx]{DriverTx: jobs.DriverTx[TTx]{Tx: tx}, q: r.q.Load()}
}

// errNoQueue is a job inserted before the store has a River client: a
// programming error (Service builds the queue before it serves), refused
// rather than silently storing an item nobody delivers.
var errNoQueue = errors.New("relay: the store has no River client yet (NewQueue first); nothing stored")

type riverTx[TTx any] struct {
	jobs.DriverTx[TTx]
	q *riverQueue[TTx]
}

var _ Tx = riverTx[struct{}]{}

func (t riverTx[TTx]) InsertJobs(ctx context.Context, list []Job) error {
	if len(list) == 0 {
		return nil
	}
	if t.q == nil {
		return errNoQueue
	}
	return t.q.insertTx(ctx, t.Tx, list)
}
