package health

import (
	"context"
	"log/slog"
	"sync"

	"github.com/jackc/pgx/v5"
)

// outage turns River UI's logging of a database outage into two lines: the
// first error when it goes down, and one line when a query succeeds again.
// Unwrapped, River UI's query loop logs an error every 10 s (and every API
// call one more) for as long as the database is away.
//
// Failures (warn and up, or any record carrying an error, such as River UI's
// "API error response" at info) pass through once per message while the
// database is down and are counted after that; the first one says that
// repeats are held back. A query that succeeds, seen by the pool's tracer,
// ends the outage.
type outage struct {
	log *slog.Logger // the unwrapped logger, for the line saying it is back

	mu         sync.Mutex
	down       bool
	seen       map[string]bool
	suppressed int
}

func newOutage(log *slog.Logger) *outage { return &outage{log: log, seen: map[string]bool{}} }

// logger is log with outage's filter in front of its handler.
func (o *outage) logger() *slog.Logger {
	return slog.New(&outageHandler{next: o.log.Handler(), o: o})
}

// pass reports whether record r is written, and whether it is the first
// failure of an outage.
func (o *outage) pass(r slog.Record) (ok, first bool) {
	if !failure(r) {
		return true, false
	}
	msg := r.Message
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.seen[msg] {
		o.suppressed++
		return false, false
	}
	o.seen[msg] = true
	first = !o.down
	o.down = true
	return true, first
}

// failure reports whether r tells of something that went wrong.
func failure(r slog.Record) bool {
	if r.Level >= slog.LevelWarn {
		return true
	}
	found := false
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "err", "error", "internal_error":
			found = true
		}
		return !found
	})
	return found
}

// ok is a query that succeeded: an outage, if any, is over.
func (o *outage) ok() {
	o.mu.Lock()
	if !o.down {
		o.mu.Unlock()
		return
	}
	n := o.suppressed
	o.down, o.suppressed = false, 0
	clear(o.seen)
	o.mu.Unlock()
	o.log.Info("river ui: the database answers again", "errors_not_logged", n)
}

// TraceQueryStart implements pgx.QueryTracer.
func (o *outage) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

// TraceQueryEnd implements pgx.QueryTracer: a query without error ends an
// outage.
func (o *outage) TraceQueryEnd(_ context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	if data.Err == nil {
		o.ok()
	}
}

var _ pgx.QueryTracer = (*outage)(nil)

// outageHandler is the slog.Handler River UI logs through.
type outageHandler struct {
	next slog.Handler
	o    *outage
}

func (h *outageHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *outageHandler) Handle(ctx context.Context, r slog.Record) error {
	ok, first := h.o.pass(r)
	if !ok {
		return nil
	}
	if first {
		r = r.Clone()
		r.AddAttrs(slog.String("repeats", "not logged until a database query succeeds again"))
	}
	return h.next.Handle(ctx, r)
}

func (h *outageHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &outageHandler{next: h.next.WithAttrs(as), o: h.o}
}

func (h *outageHandler) WithGroup(name string) slog.Handler {
	return &outageHandler{next: h.next.WithGroup(name), o: h.o}
}
