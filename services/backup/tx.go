package backup

import (
	"context"

	"github.com/blacksky-md/blacksky/shared/jobs"
)

// Tx is the transaction a snapshot or point is stored in, as the work that
// must commit with it sees it (package jobs' Tx, shared with relay): the River
// job that asked for it is completed in it, so a crash leaves either both
// (row and completed job) or neither (the job runs again).
type Tx = jobs.Tx

// InTx runs inside the transaction that stores a snapshot; nothing is stored
// unless it succeeds.
type InTx func(ctx context.Context, tx Tx) error

// DriverTx is a driver's native transaction (pgx.Tx, *sql.Tx) as a Tx.
type DriverTx[TTx any] = jobs.DriverTx[TTx]
