package backoff

import (
	"testing"
	"time"
)

func TestDelayIsJitteredBetweenMinAndDoubledCeiling(t *testing.T) {
	half := func() float64 { return 0.5 }
	zero := func() float64 { return 0 }
	top := func() float64 { return 0.999999 }
	bad := func() float64 { return 7 }
	s := time.Second
	tests := []struct {
		name    string
		min, mx time.Duration
		jitter  func() float64
		attempt int
		want    time.Duration
	}{
		{"first attempt, no jitter", s, 10 * s, zero, 1, s},
		{"first attempt, half", s, 10 * s, half, 1, 1500 * time.Millisecond},
		{"second attempt, half", s, 10 * s, half, 2, 2500 * time.Millisecond},
		{"third attempt, half", s, 10 * s, half, 3, 4500 * time.Millisecond},
		{"capped at max", s, 10 * s, half, 4, 5500 * time.Millisecond},
		{"huge attempt stays capped", s, 10 * s, top, 1 << 20, 10*s - 9*time.Microsecond},
		{"attempt 0 behaves as min", s, 10 * s, top, 0, s},
		{"negative attempt behaves as min", s, 10 * s, top, -3, s},
		{"min equals max", 5 * s, 5 * s, half, 9, 5 * s},
		{"max below min is min", 5 * s, s, half, 9, 5 * s},
		{"zero min is a millisecond", 0, 0, half, 3, time.Millisecond},
		{"bad jitter falls back to min", s, 10 * s, bad, 3, s},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Backoff{Min: tt.min, Max: tt.mx, Jitter: tt.jitter}.Delay(tt.attempt)
			if got.Round(time.Microsecond) != tt.want {
				t.Fatalf("Delay(%d) = %s, want %s", tt.attempt, got, tt.want)
			}
		})
	}
}

func TestDelayStaysInBoundsWithRealJitter(t *testing.T) {
	b := Backoff{Min: 10 * time.Millisecond, Max: 100 * time.Millisecond}
	for n := 1; n < 200; n++ {
		d := b.Delay(n)
		ceil := min(b.Max, b.Min<<min(n, 20))
		if d < b.Min || d > ceil {
			t.Fatalf("Delay(%d) = %s, outside [%s, %s]", n, d, b.Min, ceil)
		}
	}
}

// Step is the backup service's database retry: 500 ms, 1 s, 2 s, ... at
// most the cap, the same sequence its hand-rolled loops produced.
func TestStepDoublesFromMinUpToMax(t *testing.T) {
	b := Backoff{Min: 500 * time.Millisecond, Max: 10 * time.Second}
	want := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		10 * time.Second, 10 * time.Second}
	for i, w := range want {
		if got := b.Step(i + 1); got != w {
			t.Fatalf("Step(%d) = %s, want %s", i+1, got, w)
		}
	}
	if got := b.Step(1 << 30); got != 10*time.Second {
		t.Fatalf("Step(huge) = %s, want the cap", got)
	}
	if got := b.Step(0); got != 500*time.Millisecond {
		t.Fatalf("Step(0) = %s, want Min", got)
	}
}
