package jobs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// Kinds is every job kind of the product. NewClient gives each client a
// stand-in worker for the kinds its service does not work, because River's
// rescuer (which runs on the leader only, whichever client that is)
// discards a stuck job of a kind its own client has no worker for: a send
// a SIGKILLed relay was running would be thrown away by backup's client.
// With a stand-in the rescuer retries it, and the service that works its
// queue runs it again.
var Kinds = []string{
	KindSnapshot, KindSync, KindCompaction, KindRetention,
	KindRelayNATS, KindRelayWebhook, KindRelaySend,
}

// standInArgs stands for a job of another service: it decodes any args.
type standInArgs struct{ kind string }

func (a standInArgs) Kind() string { return a.kind }

// standIn is never asked to work (its client does not work the queues of
// that kind); its defaults (no timeout of its own, River's retry policy)
// are what the rescuer reads.
type standIn struct {
	river.WorkerDefaults[standInArgs]
}

var errNotWorkedHere = errors.New("jobs: this kind is worked by another service's client")

func (standIn) Work(context.Context, *river.Job[standInArgs]) error { return errNotWorkedHere }

// addStandIns registers a stand-in for every kind of Kinds that workers
// lacks. River has no lookup, and AddWorkerArgs panics on a kind already
// registered: that panic is how "the service works it" is told apart.
func addStandIns(workers *river.Workers) (err error) {
	for _, kind := range Kinds {
		if e := addStandIn(workers, kind); e != nil {
			return e
		}
	}
	return nil
}

func addStandIn(workers *river.Workers, kind string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			if strings.Contains(fmt.Sprint(r), "already registered") {
				err = nil // the service's own worker
				return
			}
			err = fmt.Errorf("jobs: stand-in for %s: %v", kind, r)
		}
	}()
	river.AddWorkerArgs(workers, standInArgs{kind: kind}, &standIn{})
	return nil
}

// availableWhenDue inserts a job whose ScheduledAt has come as available.
// River inserts every job with an explicit ScheduledAt as scheduled, even
// one due now, and only the leader's scheduler (every 5 s) makes it
// available: relay sets ScheduledAt on each delivery to keep a chat's jobs
// in seq order, which cost every incoming message up to 5 s.
type availableWhenDue struct {
	river.JobInsertMiddlewareDefaults
	now func() time.Time
}

var _ rivertype.JobInsertMiddleware = (*availableWhenDue)(nil)

func (m *availableWhenDue) InsertMany(ctx context.Context, many []*rivertype.JobInsertParams, doInner func(context.Context) ([]*rivertype.JobInsertResult, error)) ([]*rivertype.JobInsertResult, error) {
	now := m.now()
	for _, p := range many {
		if p.State == rivertype.JobStateScheduled && p.ScheduledAt != nil && !p.ScheduledAt.After(now) {
			p.State = rivertype.JobStateAvailable
		}
	}
	return doInner(ctx)
}
