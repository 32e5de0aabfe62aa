package gateway

import (
	"math/rand/v2"
	"time"
)

// Backoff computes reconnect delays: exponential with full jitter, never
// below Min nor above Max. Attempt n (from 1) draws uniformly from
// [Min, min(Max, Min*2^n)), so the first retry is quick and a long outage
// settles at random points below Max instead of a thundering herd.
type Backoff struct {
	Min, Max time.Duration
	// Jitter returns a number in [0, 1); nil means math/rand. Tests inject a
	// fixed source so delays are exact.
	Jitter func() float64
}

// Delay is the wait before attempt n (n >= 1).
func (b Backoff) Delay(n int) time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = time.Millisecond
	}
	if hi < lo {
		hi = lo
	}
	ceil := lo
	for i := 0; i < n && ceil < hi; i++ {
		ceil *= 2 // doubling stops at hi, so no overflow however large n gets
	}
	ceil = min(ceil, hi)
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
