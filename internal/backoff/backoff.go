// Package backoff is the one retry-delay rule of the product: exponential
// growth from Min to Max, with full jitter for callers that many instances
// share (the gateway reconnecting to WhatsApp) and without it for callers
// that retry their own resource on a clock tests drive step by step (the
// backup service's database).
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff computes retry delays, never below Min nor above Max (Min <= 0
// counts as a millisecond; Max below Min as Min).
type Backoff struct {
	Min, Max time.Duration
	// Jitter returns a number in [0, 1); nil means math/rand. Tests inject a
	// fixed source so delays are exact.
	Jitter func() float64
}

// bounds applies the documented defaults.
func (b Backoff) bounds() (lo, hi time.Duration) {
	lo, hi = b.Min, b.Max
	if lo <= 0 {
		lo = time.Millisecond
	}
	if hi < lo {
		hi = lo
	}
	return lo, hi
}

// Step is the delay before attempt n (n >= 1) without jitter: Min, then
// doubled for every further attempt, at most Max. Attempt 0 or less is Min.
func (b Backoff) Step(n int) time.Duration {
	lo, hi := b.bounds()
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2 // doubling stops at hi, so no overflow however large n gets
	}
	return min(d, hi)
}

// Delay is the wait before attempt n (n >= 1) with full jitter: drawn
// uniformly from [Min, Step(n+1)), so the first retry is quick and a long
// outage settles at random points below Max instead of a thundering herd.
func (b Backoff) Delay(n int) time.Duration {
	lo, _ := b.bounds()
	ceil := b.Step(max(n, 0) + 1)
	j := rand.Float64
	if b.Jitter != nil {
		j = b.Jitter
	}
	f := j()
	if f < 0 || f >= 1 {
		f = 0 // a broken source must not push the delay outside [Min, Max]
	}
	return lo + time.Duration(f*float64(ceil-lo))
}
