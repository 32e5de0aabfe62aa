package dboutage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/blacksky-md/blacksky/internal/testlog"
)

// Only a connection error, logged or seen by the pool's tracer, starts an
// outage; while it lasts one failure is written, and the next success
// writes one line more.
func TestOutageHandlerKeepsOtherLines(t *testing.T) {
	logs := &testlog.Buffer{}
	o := New(logs.Logger(), "river ui")
	log := o.Logger().With("service", "riverui")
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	ctx := context.Background()

	log.Info("request", "n", 1)
	log.Info("API error response", "error", errors.New("job not found")) // River UI's ordinary 404
	log.Warn("another problem")
	log.Warn("another problem")
	o.OK()
	if got := logs.String(); strings.Contains(got, "answers again") || strings.Contains(got, "not logged until") {
		t.Fatalf("no connection error, yet an outage:\n%s", got)
	}

	log.Error("Error running query", "err", fmt.Errorf("query: %w", refused))
	log.Error("Error running query", "err", refused)
	log.Error("another cacher: Error running query", "err", refused)
	log.Info("API error response", "internal_error", "conn closed")
	o.OK()
	o.OK()

	// The tracer sees the pool fail to connect before River UI logs it.
	o.TraceAcquireEnd(ctx, nil, pgxpool.TraceAcquireEndData{Err: refused})
	log.Info("API error response", "internal_error", "failed to connect")
	log.Info("API error response", "internal_error", "failed to connect")
	o.TraceQueryEnd(ctx, nil, pgx.TraceQueryEndData{})
	// A cancelled request is no outage.
	o.TraceQueryEnd(ctx, nil, pgx.TraceQueryEndData{Err: context.Canceled})
	log.Info("API error response", "error", errors.New("job not found"))
	o.TraceQueryEnd(ctx, nil, pgx.TraceQueryEndData{})

	out := logs.String()
	if got := strings.Count(out, "not logged until"); got != 2 {
		t.Errorf("%d lines opening an outage, want one for each of the two:\n%s", got, out)
	}
	if got := strings.Count(out, "answers again"); got != 2 {
		t.Errorf("%d lines closing an outage, want two:\n%s", got, out)
	}
	if !strings.Contains(out, "errors_not_logged=3") || !strings.Contains(out, "errors_not_logged=1") {
		t.Errorf("the closing lines should count what was held back (3, then 1):\n%s", out)
	}
	if got := len(logs.Lines("level=WARN")); got != 2 {
		t.Errorf("%d warn lines, want both ordinary ones:\n%s", got, out)
	}
	if got := strings.Count(out, "job not found"); got != 2 {
		t.Errorf("%d 'job not found' lines, want both:\n%s", got, out)
	}
	if !strings.Contains(out, "service=riverui") {
		t.Errorf("attributes lost: %s", out)
	}
}

func TestConnErrorTellsTheDatabaseIsAway(t *testing.T) {
	for _, tt := range []struct {
		err  error
		conn bool
	}{
		{&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, true},
		{fmt.Errorf("read: %w", io.ErrUnexpectedEOF), true},
		{&pgconn.PgError{Code: "57P01"}, true},
		{&pgconn.PgError{Code: "08006"}, true},
		{&pgconn.PgError{Code: "42P01"}, false}, // undefined table
		{errors.New("job not found"), false},
		{context.Canceled, false},
		{nil, false},
	} {
		if got := ConnError(tt.err); got != tt.conn {
			t.Errorf("ConnError(%v) = %v, want %v", tt.err, got, tt.conn)
		}
	}
}
