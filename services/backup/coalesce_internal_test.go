package backup

import (
	"testing"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// Requests naming different reasons share one job: each new reason must not
// cost a full snapshot of its own.
func TestRequestsCoalesceWhateverTheirReason(t *testing.T) {
	c := newCoalescer()
	jobs := 0
	reasons := []string{bus.ReasonManual, bus.ReasonScheduled, bus.ReasonRestorePoint, bus.ReasonPaired, bus.ReasonShutdown}
	for i := range 300 {
		if _, _, enqueue := c.add(reasons[i%len(reasons)], i%2 == 0); enqueue {
			jobs++
		}
	}
	if jobs != 1 {
		t.Fatalf("300 requests with %d reasons enqueued %d jobs; want 1", len(reasons), jobs)
	}
	// Once that job has read the store, the next request needs a new one.
	n := c.beginRead()
	if _, _, enqueue := c.add(bus.ReasonScheduled, false); !enqueue {
		t.Fatal("a request after the read did not enqueue a job")
	}
	if _, _, enqueue := c.add(bus.ReasonManual, false); enqueue {
		t.Fatal("a second request after the read enqueued another job")
	}
	c.finish(n, Outcome{})
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.waiters) != 0 {
		t.Fatalf("%d waiters left after the run that covers them", len(c.waiters))
	}
}
