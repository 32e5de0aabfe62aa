// Package logging builds the process's slog.Logger (text locally, JSON in
// production) with a last line of defence that hides secret values and masks
// WhatsApp JIDs in every string and error attribute, and
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
			switch a.Value.Kind() {
			case slog.KindString:
				a.Value = slog.StringValue(clean(a.Value.String(), secrets))
			case slog.KindAny:
				// Errors of libraries quote what they were given: a
				// password, or a JID (whatsmeow's "failed to get LID for
				// PN 15551234567@s.whatsapp.net").
				if err, ok := a.Value.Any().(error); ok && err != nil {
					if msg := err.Error(); len(secrets) > 0 || strings.Contains(msg, "@") {
						a.Value = slog.StringValue(clean(msg, secrets))
					}
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

// clean is what a logged text becomes: secrets hidden, user JIDs masked as
// /status masks them. The JID pattern only runs on text holding an '@'.
func clean(s string, secrets []string) string {
	s = Redact(s, secrets)
	if strings.Contains(s, "@") {
		s = MaskJIDs(s)
	}
	return s
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
