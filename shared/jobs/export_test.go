package jobs

import "log/slog"

// QuietHandlerForTest is the handler River's logger goes through.
func QuietHandlerForTest(next slog.Handler) slog.Handler { return quietHandler{next: next} }
