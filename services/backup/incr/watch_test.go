package incr

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
)

func TestWatcherNoticesCommitsAndKeepsTheLagUntilShipped(t *testing.T) {
	path := newStore(t, 0)
	db := openDB(t, path)
	clock := clockwork.NewFakeClock()
	w, err := NewWatcher(t.Context(), path, WatcherOptions{Interval: 50 * time.Millisecond, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := w.Run(ctx); err != nil {
			t.Error(err)
		}
	})
	defer func() {
		cancel()
		wg.Wait()
		if err := w.Close(); err != nil {
			t.Error(err)
		}
	}()
	tick := func() {
		t.Helper()
		if err := clock.BlockUntilContext(t.Context(), 1); err != nil {
			t.Fatal(err)
		}
		clock.Advance(50 * time.Millisecond)
	}
	waitChange := func() {
		t.Helper()
		select {
		case <-w.Changes():
		case <-time.After(10 * time.Second):
			t.Fatal("commit not noticed")
		}
	}

	tick()
	tick()
	if w.Lag() != 0 {
		t.Fatalf("lag %s without commits", w.Lag())
	}
	mustExec(t, db, "INSERT INTO whatsmeow_version (version, compat) VALUES (999, 1)")
	tick()
	waitChange()
	clock.Advance(200 * time.Millisecond)
	if got := w.Lag(); got != 200*time.Millisecond {
		t.Fatalf("lag %s, want 200ms", got)
	}
	m1 := w.Shipping()
	// A commit while the point is being taken is not covered by it.
	mustExec(t, db, "DELETE FROM whatsmeow_version WHERE version = 999")
	tick()
	waitChange()
	w.Shipped(m1)
	if got := w.Lag(); got != 0 {
		t.Fatalf("lag %s right after the commit, want 0 (noticed at this instant)", got)
	}
	clock.Advance(30 * time.Millisecond)
	if got := w.Lag(); got != 30*time.Millisecond {
		t.Fatalf("lag %s of the uncovered commit, want 30ms", got)
	}
	w.Shipped(w.Shipping())
	if w.Lag() != 0 {
		t.Fatalf("lag %s after everything shipped", w.Lag())
	}
}
