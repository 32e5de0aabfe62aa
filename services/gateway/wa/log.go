package wa

import (
	"context"
	"fmt"
	"log/slog"

	waLog "go.mau.fi/whatsmeow/util/log"

	"github.com/blacksky-md/blacksky/shared/logging"
)

// slogLogger adapts slog to whatsmeow's five-method logger.
type slogLogger struct {
	l      *slog.Logger
	module string
}

var _ waLog.Logger = slogLogger{}

// NewLogger returns a whatsmeow logger writing to l.
func NewLogger(l *slog.Logger) waLog.Logger { return slogLogger{l: l, module: "whatsmeow"} }

func (s slogLogger) logf(level slog.Level, msg string, args []any) {
	ctx := context.Background()
	if !s.l.Enabled(ctx, level) {
		return // spare the Sprintf of whatsmeow's chatty debug lines
	}
	// whatsmeow names accounts by JID; logs go to drains, so mask them as
	// ours are masked.
	s.l.Log(ctx, level, logging.MaskJIDs(fmt.Sprintf(msg, args...)), "module", s.module)
}

func (s slogLogger) Errorf(msg string, args ...any) { s.logf(slog.LevelError, msg, args) }
func (s slogLogger) Warnf(msg string, args ...any)  { s.logf(slog.LevelWarn, msg, args) }
func (s slogLogger) Infof(msg string, args ...any)  { s.logf(slog.LevelInfo, msg, args) }
func (s slogLogger) Debugf(msg string, args ...any) { s.logf(slog.LevelDebug, msg, args) }

func (s slogLogger) Sub(module string) waLog.Logger {
	return slogLogger{l: s.l, module: s.module + "/" + module}
}
