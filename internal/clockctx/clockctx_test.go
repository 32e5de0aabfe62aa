package clockctx

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestEndsWithErrTimeoutOnlyWhenTheFakeClockPasses(t *testing.T) {
	clock := clockwork.NewFakeClock()
	ctx, cancel := WithTimeout(context.Background(), clock, time.Second)
	defer cancel()
	clock.Advance(999 * time.Millisecond)
	if ctx.Err() != nil {
		t.Fatalf("ended a millisecond early: %v", ctx.Err())
	}
	clock.Advance(time.Millisecond)
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("not ended once the duration passed")
	}
	cause := context.Cause(ctx)
	if !errors.Is(cause, ErrTimeout) || !errors.Is(cause, context.DeadlineExceeded) {
		t.Fatalf("cause = %v; want ErrTimeout, matching context.DeadlineExceeded", cause)
	}
}

func TestCancelIsNotATimeout(t *testing.T) {
	clock := clockwork.NewFakeClock()
	ctx, cancel := WithTimeout(context.Background(), clock, time.Second)
	cancel()
	clock.Advance(time.Hour)
	if cause := context.Cause(ctx); !errors.Is(cause, context.Canceled) || errors.Is(cause, ErrTimeout) {
		t.Fatalf("cause = %v; want context.Canceled", cause)
	}
}

func TestParentCancelEndsIt(t *testing.T) {
	parent, stop := context.WithCancel(context.Background())
	ctx, cancel := WithTimeout(parent, clockwork.NewFakeClock(), time.Hour)
	defer cancel()
	stop()
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("err = %v; want canceled with the parent", ctx.Err())
	}
}
