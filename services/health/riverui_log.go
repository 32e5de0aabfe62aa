package health

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// outage turns River UI's logging of a database outage into two lines: the
// first failure when it goes down, and one line when a query succeeds again.
// Unwrapped, River UI's query loop logs "Error running query" every 10 s
// (and every API call one more) for as long as the database is away.
//
// Only connection errors say the database is down: the pool's tracer seeing
// an acquire or a query fail with one (see connError), or a logged record
// carrying one. River UI's ordinary failures (a 404 "job not found" logged
// as "API error response" with an error) pass through and change nothing.
// While it is down, the first failure passes, saying that repeats are held
// back, and every later one is counted; a query that succeeds, seen by the
// tracer, ends the outage.
type outage struct {
	log *slog.Logger // the unwrapped logger, for the line saying it is back

	mu         sync.Mutex
	down       bool // a connection error was seen, no query succeeded since
	reported   bool // the line saying so was written
	suppressed int
}

func newOutage(log *slog.Logger) *outage { return &outage{log: log} }

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
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.down && !carriesConnError(r) {
		return true, false
	}
	o.down = true
	if o.reported {
		o.suppressed++
		return false, false
	}
	o.reported = true
	return true, true
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

// carriesConnError reports whether an attribute of r is a connection error.
func carriesConnError(r slog.Record) bool {
	found := false
	r.Attrs(func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && connError(err) {
			found = true
		}
		return !found
	})
	return found
}

// connError reports whether err says the database cannot be reached or
// dropped the connection, rather than that a query or request was wrong.
// A cancelled request (a browser leaving the page) is neither.
func connError(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &ce), errors.As(err, &ne), pgconn.Timeout(err), pgconn.SafeToRetry(err),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return true
	case errors.As(err, &pe):
		// Class 08: connection exception; 57P01-57P03: the server is
		// shutting down, crashed or cannot take connections yet.
		return strings.HasPrefix(pe.Code, "08") || pe.Code == "57P01" || pe.Code == "57P02" || pe.Code == "57P03"
	}
	return false
}

// connFailed is a connection error seen by the pool's tracer.
func (o *outage) connFailed() {
	o.mu.Lock()
	o.down = true
	o.mu.Unlock()
}

// ok is a query that succeeded: an outage, if any, is over.
func (o *outage) ok() {
	o.mu.Lock()
	if !o.down {
		o.mu.Unlock()
		return
	}
	n, reported := o.suppressed, o.reported
	o.down, o.reported, o.suppressed = false, false, 0
	o.mu.Unlock()
	if reported {
		o.log.Info("river ui: the database answers again", "errors_not_logged", n)
	}
}

// TraceQueryStart implements pgx.QueryTracer.
func (o *outage) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

// TraceQueryEnd implements pgx.QueryTracer: a query without error ends an
// outage, one failing with a connection error starts one.
func (o *outage) TraceQueryEnd(_ context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	switch {
	case data.Err == nil:
		o.ok()
	case connError(data.Err):
		o.connFailed()
	}
}

// TraceAcquireStart implements pgxpool.AcquireTracer.
func (o *outage) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	return ctx
}

// TraceAcquireEnd implements pgxpool.AcquireTracer: the pool could not
// connect. It runs before River UI hears of the failure and logs it.
func (o *outage) TraceAcquireEnd(_ context.Context, _ *pgxpool.Pool, data pgxpool.TraceAcquireEndData) {
	if connError(data.Err) {
		o.connFailed()
	}
}

var _ pgxpool.AcquireTracer = (*outage)(nil)
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
