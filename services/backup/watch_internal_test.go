package backup

import (
	"testing"
	"time"
)

// LeaseWatch, the rule both a standby and restore --force follow: the
// holder's advertised TTL when longer than ours, a changed row or a gap
// starts over, and so does one slow read.
func TestLeaseWatchRule(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	row := func(renewed time.Time, ttl time.Duration, v int64) Lease {
		return Lease{Holder: "h", RenewedAt: renewed, ExpiresAt: renewed.Add(ttl), Version: v}
	}
	w := LeaseWatch{TTL: 10 * time.Second, MaxGap: 4 * time.Second}
	if got := w.Need(row(t0, time.Minute, 1)); got != time.Minute {
		t.Fatalf("Need of a 60 s row = %s", got)
	}
	if got := w.Need(row(t0, 3*time.Second, 1)); got != 10*time.Second {
		t.Fatalf("Need of a 3 s row = %s; want our own 10 s", got)
	}

	// Read every second: a 10 s row may be taken after 10 s, not before.
	l := row(t0, 10*time.Second, 1)
	at := t0
	w.Answered(l, at, at)
	for i := 0; i < 9; i++ {
		at = at.Add(time.Second)
		if s := w.Stale(at); s.Holder != "" {
			t.Fatalf("stale after %s", at.Sub(t0))
		}
		w.Answered(l, at, at)
	}
	if s := w.Stale(at.Add(time.Second)); !s.Same(l) {
		t.Fatal("not stale after 10 s of answered reads")
	}

	// A renewal starts over and reports it.
	l2 := row(at, 10*time.Second, 2)
	if !w.Answered(l2, at.Add(time.Second), at.Add(time.Second)) {
		t.Fatal("a changed row was not reported as renewed")
	}
	if s := w.Stale(at.Add(2 * time.Second)); s.Holder != "" {
		t.Fatal("stale right after a renewal")
	}

	// A read that took longer than MaxGap counts from its answer only.
	w.Reset()
	w.Answered(l, t0, t0)
	w.Answered(l, t0.Add(time.Second), t0.Add(9500*time.Millisecond))
	if s := w.Stale(t0.Add(10500 * time.Millisecond)); s.Holder != "" {
		t.Fatal("a 8.5 s read counted as watching")
	}

	// A gap between answered reads starts over.
	w.Reset()
	w.Answered(l, t0, t0)
	if s := w.Stale(t0.Add(11 * time.Second)); s.Holder != "" {
		t.Fatal("stale after one read and an 11 s gap")
	}
	if _, since, _ := w.Watched(); !since.IsZero() {
		t.Fatal("the watch did not start over after a gap")
	}
}
