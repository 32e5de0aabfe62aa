// Package clockctx bounds a context by a duration on an injected clock, so
// tests drive timeouts with a fake clock. (clockwork's own WithTimeout has
// an Err that blocks until the deadline, which breaks every library that
// polls ctx.Err().)
package clockctx

import (
	"context"
	"time"

	"github.com/jonboulle/clockwork"
)

// ErrTimeout is the cause (context.Cause) of a context from WithTimeout
// whose duration ran out. It matches context.DeadlineExceeded under
// errors.Is, so callers that only ask "did time run out" need not know it.
var ErrTimeout error = timeoutError{}

type timeoutError struct{}

func (timeoutError) Error() string        { return "timed out" }
func (timeoutError) Is(target error) bool { return target == context.DeadlineExceeded }

// WithTimeout is context.WithTimeout on clock: once d has passed on it, the
// context ends with cause ErrTimeout (its Err is context.Canceled, as for
// every context.WithCancelCause). cancel stops the timer.
func WithTimeout(parent context.Context, clock clockwork.Clock, d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	t := clock.AfterFunc(d, func() { cancel(ErrTimeout) })
	return ctx, func() {
		t.Stop()
		cancel(context.Canceled)
	}
}
