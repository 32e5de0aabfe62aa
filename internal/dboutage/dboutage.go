// Package dboutage collapses the log of a database outage: River, River UI
// and their pools log each failed poll or query (several a second), and an
// outage of minutes buries everything else. Through an Outage's logger the
// first failure is written, saying repeats are held back, and one line
// when the database answers again counts them.
package dboutage

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

// Outage turns the logging of a database outage into two lines: the first
// failure when it goes down, and one line when a query succeeds again.
//
// Only connection errors say the database is down: the pool's tracer seeing
// an acquire or a query fail with one (see ConnError), a logged record
// carrying one, or the owner calling ConnFailed. Ordinary failures (River
// UI's 404 "job not found" logged as "API error response" with an error)
// pass through and change nothing. While it is down, the first failure
// passes, saying that repeats are held back, and every later one is
// counted; a query that succeeds (seen by the tracer, or told by OK) ends
// the outage.
type Outage struct {
	log  *slog.Logger // the unwrapped logger, for the line saying it is back
	what string       // who logs: "river ui", "relay"

	mu         sync.Mutex
	down       bool // a connection error was seen, no query succeeded since
	reported   bool // the line saying so was written
	suppressed int
}

// New is an Outage for the logs of what ("river ui", "relay") going to log.
func New(log *slog.Logger, what string) *Outage { return &Outage{log: log, what: what} }

// Logger is the outage's log with its filter in front of its handler: give
// it to River, River UI, or whatever logs each failed attempt.
func (o *Outage) Logger() *slog.Logger { return o.Wrap(o.log) }

// Wrap is log with the outage's filter in front of its handler.
func (o *Outage) Wrap(log *slog.Logger) *slog.Logger {
	return slog.New(&outageHandler{next: log.Handler(), o: o})
}

// pass reports whether record r is written, and whether it is the first
// failure of an outage.
func (o *Outage) pass(r slog.Record) (ok, first bool) {
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
		if err, ok := a.Value.Any().(error); ok && ConnError(err) {
			found = true
		}
		return !found
	})
	return found
}

// ConnError reports whether err says the database cannot be reached or
// dropped the connection, rather than that a query or request was wrong.
// A cancelled request (a browser leaving the page) is neither.
func ConnError(err error) bool {
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

// ConnFailed starts an outage: a connection error seen by the pool's tracer
// or by the owner.
func (o *Outage) ConnFailed() {
	o.mu.Lock()
	o.down = true
	o.mu.Unlock()
}

// OK is a query that succeeded: an outage, if any, is over.
func (o *Outage) OK() {
	o.mu.Lock()
	if !o.down {
		o.mu.Unlock()
		return
	}
	n, reported := o.suppressed, o.reported
	o.down, o.reported, o.suppressed = false, false, 0
	o.mu.Unlock()
	if reported {
		o.log.Info(o.what+": the database answers again", "errors_not_logged", n)
	}
}

// TraceQueryStart implements pgx.QueryTracer.
func (o *Outage) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

// TraceQueryEnd implements pgx.QueryTracer: a query without error ends an
// outage, one failing with a connection error starts one.
func (o *Outage) TraceQueryEnd(_ context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	switch {
	case data.Err == nil:
		o.OK()
	case ConnError(data.Err):
		o.ConnFailed()
	}
}

// TraceAcquireStart implements pgxpool.AcquireTracer.
func (o *Outage) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	return ctx
}

// TraceAcquireEnd implements pgxpool.AcquireTracer: the pool could not
// connect. It runs before River UI hears of the failure and logs it.
func (o *Outage) TraceAcquireEnd(_ context.Context, _ *pgxpool.Pool, data pgxpool.TraceAcquireEndData) {
	if ConnError(data.Err) {
		o.ConnFailed()
	}
}

var _ pgxpool.AcquireTracer = (*Outage)(nil)
var _ pgx.QueryTracer = (*Outage)(nil)

// outageHandler is the slog.Handler an Outage's logger writes through.
type outageHandler struct {
	next slog.Handler
	o    *Outage
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
