package jobs

import (
	"context"
	"fmt"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/rivertype"
)

// Tx is a store's transaction as the work that must commit with it sees
// it: a worker completes its River job in the same transaction as the rows
// it writes, so a crash leaves both (rows and completed job) or neither
// (the job runs again). Services extend it (relay's Tx also inserts jobs).
type Tx interface {
	// CompleteJob marks the running River job completed in this
	// transaction. It works only inside that job's worker (River finds its
	// client in ctx).
	CompleteJob(ctx context.Context, job *rivertype.JobRow) error
}

// DriverTx is a driver's native transaction (pgx.Tx, *sql.Tx) as a Tx: a
// store wraps its own transaction in it, typed by the same parameter as its
// River driver, so no side ever casts.
type DriverTx[TTx any] struct{ Tx TTx }

var _ Tx = DriverTx[struct{}]{}

// CompleteJob completes job through River's driver for TTx.
// Outside a River worker it is an error (River itself would panic).
func (t DriverTx[TTx]) CompleteJob(ctx context.Context, job *rivertype.JobRow) error {
	if _, err := river.ClientFromContextSafely[TTx](ctx); err != nil {
		return fmt.Errorf("complete job %d: %w", job.ID, err)
	}
	_, err := river.JobCompleteTx[riverdriver.Driver[TTx]](ctx, t.Tx, &river.Job[completedArgs]{JobRow: job})
	return err
}

// completedArgs receives the completed job's arguments, which nobody reads:
// JobCompleteTx decodes them, and an empty struct accepts any job's.
type completedArgs struct{}

func (completedArgs) Kind() string { return "" }
