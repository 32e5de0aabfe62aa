// Package logging builds the process's slog.Logger (text locally, JSON in
// production) with a last line of defence that hides secret values, and
// durations written the way a person reads them ("25s", not 25000000000).
package logging

import (
	"io"
	"log/slog"
	"strings"
)

// Options configure New.
type Options struct {
	Level  slog.Level
	Format string // "text" or "json"
	// Secrets are values that must never be printed; any string attribute
	// containing one has it replaced.
	Secrets []string
}

// New returns a logger writing to w.
func New(w io.Writer, o Options) *slog.Logger {
	secrets := make([]string, 0, len(o.Secrets))
	for _, s := range o.Secrets {
		if len(s) >= 4 { // shorter values would mangle ordinary text
			secrets = append(secrets, s)
		}
	}
	ho := &slog.HandlerOptions{
		Level: o.Level,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				// slog's JSON handler writes a duration as integer
				// nanoseconds; a log reader wants "25s".
				a.Value = slog.StringValue(a.Value.Duration().String())
				return a
			}
			if len(secrets) == 0 {
				return a
			}
			switch a.Value.Kind() {
			case slog.KindString:
				a.Value = slog.StringValue(Redact(a.Value.String(), secrets))
			case slog.KindAny:
				if err, ok := a.Value.Any().(error); ok {
					a.Value = slog.StringValue(Redact(err.Error(), secrets))
				}
			}
			return a
		},
	}
	if o.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}

// Redact replaces every secret in s.
func Redact(s string, secrets []string) string {
	for _, sec := range secrets {
		if sec != "" && strings.Contains(s, sec) {
			s = strings.ReplaceAll(s, sec, "[redacted]")
		}
	}
	return s
}

// Discard is a logger for tests that do not read logs.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
