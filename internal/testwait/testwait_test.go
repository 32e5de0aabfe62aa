package testwait_test

import (
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
)

func TestForReturnsOnceTheConditionHolds(t *testing.T) {
	var n atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n.Load() < 3 {
			n.Add(1)
		}
	}()
	testwait.For(t, 5*time.Second, "three increments", func() bool { return n.Load() >= 3 })
	<-done
}

// fakeTB records a Fatalf instead of ending the goroutine's test.
type fakeTB struct {
	testing.TB
	failed chan string
}

func (f *fakeTB) Helper() {}

func (f *fakeTB) Fatalf(format string, args ...any) {
	f.failed <- format
	runtime.Goexit() // as testing's Fatalf does
}

func TestForFailsAfterTheDeadline(t *testing.T) {
	tb := &fakeTB{TB: t, failed: make(chan string, 1)}
	go testwait.For(tb, 20*time.Millisecond, "never", func() bool { return false })
	select {
	case msg := <-tb.failed:
		if msg != "timed out after %s waiting for %s" {
			t.Fatalf("failure message %q", msg)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("For did not give up after its deadline")
	}
}
