package jobs

import (
	"context"
	"log/slog"
)

// quietHandler keeps River's own log to warnings and errors. River writes
// an INFO line for its producers' job counts every few seconds while jobs
// flow and for each maintenance run; with a sync job a second that was a
// dozen lines a minute, for nothing an operator acts on.
type quietHandler struct {
	next slog.Handler
}

func (h quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn && h.next.Enabled(ctx, l)
}

func (h quietHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h quietHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return quietHandler{next: h.next.WithAttrs(as)}
}

func (h quietHandler) WithGroup(name string) slog.Handler {
	return quietHandler{next: h.next.WithGroup(name)}
}
