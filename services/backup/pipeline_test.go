package backup_test

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/jonboulle/clockwork"
)

type heldLease bool

func (h heldLease) Held() bool { return bool(h) }

type pipelineRig struct {
	pipe    *backup.Snapshots
	st      backup.Store
	path    string
	mu      sync.Mutex
	reports []backup.Outcome
}

func newPipelineRig(t *testing.T) *pipelineRig {
	t.Helper()
	dir := t.TempDir()
	st := newDatabase(t, "sqlite").mustOpen(t)
	if _, ok, err := st.AcquireLease(context.Background(), session, "me", time.Now(), time.Hour, backup.Lease{}); err != nil || !ok {
		t.Fatalf("lease: %v %v", ok, err)
	}
	r := &pipelineRig{st: st, path: newStore(t, dir, 64<<10)}
	r.pipe = backup.NewSnapshots(backup.SnapshotsConfig{Session: session, Holder: "me", SessionPath: r.path, TmpDir: dir,
		Local: backup.Local{Dir: filepath.Join(dir, "backups")}, Retention: backup.Retention{Count: 10}, Clock: clockwork.NewRealClock(), Log: discard(),
		Lease: heldLease(true), Report: func(_ backup.JobInfo, o backup.Outcome, _ time.Duration) {
			r.mu.Lock()
			r.reports = append(r.reports, o)
			r.mu.Unlock()
		}})
	return r
}

func (r *pipelineRig) point(t *testing.T, cat backup.Catalog) backup.Outcome {
	t.Helper()
	o, err := r.pipe.Point(context.Background(), backup.Run{Job: backup.JobInfo{Reason: bus.ReasonManual}, Catalog: cat})
	if err != nil {
		t.Fatalf("point: %v", err)
	}
	return o
}

// The seam: a request registered before a point reads the store is answered
// with that point's outcome (what was stored, where); requests before the
// next read share one queued run; the outcome is reported before it is
// answered.
func TestPipelinePointAnswersTheRequestsItCovers(t *testing.T) {
	r := newPipelineRig(t)
	w, gen, queue := r.pipe.Want(bus.ReasonManual, true)
	if !queue {
		t.Fatal("the first request queued no run")
	}
	if _, gen2, again := r.pipe.Want(bus.ReasonPaired, false); again || gen2 != gen {
		t.Fatalf("a second request before the read queued again (%v) or for another gen (%d, %d)", again, gen2, gen)
	}
	o := r.point(t, r.st)
	select {
	case got := <-w.Done():
		if got.Err != nil || got.Where != bus.StoredDatabase || got.Ref.ID == 0 || got.Ref.ID != o.Ref.ID {
			t.Fatalf("answer = %+v; want the point in the database (%+v)", got, o)
		}
	default:
		t.Fatal("the covered request was not answered")
	}
	r.mu.Lock()
	n := len(r.reports)
	r.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d reports; want one per point", n)
	}
	if _, _, queue := r.pipe.Want(bus.ReasonManual, false); !queue {
		t.Fatal("a request after the read did not queue a new run")
	}
	// Unchanged store: the database's newest row covers it.
	if again := r.point(t, r.st); !again.Ref.Unchanged || again.Ref.ID != o.Ref.ID {
		t.Fatalf("second point of an unchanged store = %+v; want the same row, unchanged", again)
	}
}

// Without a catalog a point reaches the local fallback only and is
// unshipped until Ship stores it in the database.
func TestPipelineShipsWhatReachedTheLocalFallbackOnly(t *testing.T) {
	r := newPipelineRig(t)
	if _, ran, _ := r.pipe.Ship(context.Background(), r.st); ran {
		t.Fatal("shipped with nothing unshipped")
	}
	write(t, r.path, 5)
	if o := r.point(t, nil); o.Where != bus.StoredLocal || o.Ref.ID != 0 {
		t.Fatalf("local point = %+v; want the local fallback only", o)
	}
	if !r.pipe.Unshipped() {
		t.Fatal("a local-only point is not unshipped")
	}
	o, ran, err := r.pipe.Ship(context.Background(), r.st)
	if err != nil || !ran || o.Where != bus.StoredDatabase || o.Ref.ID == 0 {
		t.Fatalf("ship = %+v, ran %v, err %v; want it in the database", o, ran, err)
	}
	if r.pipe.Unshipped() {
		t.Fatal("still unshipped after Ship")
	}
	list, err := r.st.List(context.Background(), session, 10)
	if err != nil || len(list) != 1 || list[0].ID != o.Ref.ID {
		t.Fatalf("database = %+v, %v; want the shipped point", list, err)
	}
	// Another instance's store replaces ours: nothing to ship.
	write(t, r.path, 5)
	r.point(t, nil)
	r.pipe.Disown()
	if r.pipe.Unshipped() {
		t.Fatal("unshipped after Disown")
	}
}

// A holder that lost the lease stores nothing in the database.
func TestPipelineRefusesTheDatabaseWithoutTheLease(t *testing.T) {
	r := newPipelineRig(t)
	steal(t, r.st, "other")
	_, err := r.pipe.Point(context.Background(), backup.Run{Job: backup.JobInfo{Reason: bus.ReasonManual}, Catalog: r.st})
	if !errors.Is(err, backup.ErrLeaseLost) {
		t.Fatalf("err = %v; want ErrLeaseLost", err)
	}
	if list, _ := r.st.List(context.Background(), session, 10); len(list) != 0 {
		t.Fatalf("%d rows stored without the lease", len(list))
	}
}
