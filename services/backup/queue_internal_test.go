package backup

import (
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river"
)

// Every backup worker's attempt ends before River's rescuer would take the
// job for stuck (jobs.RescueAfter): otherwise a slow point or retention pass
// would run twice at once.
func TestEveryBackupWorkerTimesOutBeforeTheRescuer(t *testing.T) {
	timeouts := map[string]time.Duration{
		jobs.KindSnapshot:   (&snapshotWorker{}).Timeout(&river.Job[snapshotArgs]{}),
		jobs.KindSync:       (&pointWorker[syncArgs]{}).Timeout(&river.Job[syncArgs]{}),
		jobs.KindCompaction: (&pointWorker[compactionArgs]{}).Timeout(&river.Job[compactionArgs]{}),
		jobs.KindRetention:  (&retentionWorker{}).Timeout(&river.Job[retentionArgs]{}),
	}
	for kind, d := range timeouts {
		if d <= 0 || d >= jobs.RescueAfter {
			t.Errorf("%s: Timeout %s; want positive and below jobs.RescueAfter (%s)", kind, d, jobs.RescueAfter)
		}
	}
}
