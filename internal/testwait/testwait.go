// Package testwait is how tests wait for something another goroutine or
// process does: poll a condition on a ticker until it holds or a deadline
// passes. One helper for every package, so no test sleeps and hopes.
package testwait

import (
	"testing"
	"time"
)

// Interval is For's polling period. Tests that move a fake clock inside
// their condition move it once per poll, so this also sets how fast fake time
// runs against real I/O; do not shorten it lightly.
const Interval = 5 * time.Millisecond

// For polls cond every Interval until it holds; the test fails when d
// passes first (naming what it waited for) or when the test itself ends.
func For(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	Every(tb, d, Interval, what, cond)
}

// Every is For with its own polling period, for conditions that cost a
// request or a query each time.
func Every(tb testing.TB, d, every time.Duration, what string, cond func() bool) {
	tb.Helper()
	if cond() {
		return
	}
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-deadline.C:
			if cond() {
				return
			}
			tb.Fatalf("timed out after %s waiting for %s", d, what)
		case <-tb.Context().Done():
			tb.Fatalf("test ended while waiting for %s", what)
		case <-tick.C:
			if cond() {
				return
			}
		}
	}
}
