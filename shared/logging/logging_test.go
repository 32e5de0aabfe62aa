package logging_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/logging"
)

func TestSecretsNeverPrinted(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		var buf bytes.Buffer
		log := logging.New(&buf, logging.Options{Format: format, Secrets: []string{"hunter2hunter2", "tok"}})
		log.Info("connecting", "url", "postgres://u:hunter2hunter2@db/app", "err", errors.New("auth failed for hunter2hunter2"), "word", "tokens")
		out := buf.String()
		if strings.Contains(out, "hunter2hunter2") {
			t.Errorf("%s: secret printed: %s", format, out)
		}
		if !strings.Contains(out, "[redacted]") {
			t.Errorf("%s: want a redaction mark: %s", format, out)
		}
		if !strings.Contains(out, "tokens") {
			t.Errorf("%s: short secrets must not mangle ordinary words: %s", format, out)
		}
		if format == "json" && !json.Valid(bytes.TrimSpace(buf.Bytes())) {
			t.Errorf("json output is not JSON: %s", out)
		}
	}
}

func TestDurationsReadable(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		var buf bytes.Buffer
		log := logging.New(&buf, logging.Options{Format: format})
		log.Info("reconnect scheduled", "delay", 25*time.Second, slog.Group("lease", "ttl", time.Minute+500*time.Millisecond))
		out := buf.String()
		if strings.Contains(out, "25000000000") || !strings.Contains(out, "25s") || !strings.Contains(out, "1m0.5s") {
			t.Errorf("%s: durations not readable: %s", format, out)
		}
		if format == "json" {
			var rec struct {
				Delay string `json:"delay"`
				Lease struct {
					TTL string `json:"ttl"`
				} `json:"lease"`
			}
			if err := json.Unmarshal(buf.Bytes(), &rec); err != nil || rec.Delay != "25s" || rec.Lease.TTL != "1m0.5s" {
				t.Errorf("json: delay %q, lease.ttl %q (%v): %s", rec.Delay, rec.Lease.TTL, err, out)
			}
		}
	}
}

func TestMaskJIDsInText(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"paired 15551234567:12@s.whatsapp.net on android", "paired 1555****567@s.whatsapp.net on android"},
		{"from 15551234567@c.us and 987654321098765@lid", "from 1555****567@c.us and 9876****765@lid"},
		{"group 120363025246125486@g.us stays", "group 120363025246125486@g.us stays"},
		{"no jid here, user@example.com", "no jid here, user@example.com"},
	} {
		if got := logging.MaskJIDs(tc.in); got != tc.want {
			t.Errorf("MaskJIDs(%q) = %q; want %q", tc.in, got, tc.want)
		}
	}
}

// whatsmeow's errors quote the JIDs they were given; logged as an error
// value or a string, a user JID shows masked, as /status shows it.
func TestJIDsInErrorsAreMasked(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		for _, secrets := range [][]string{nil, {"hunter2hunter2"}} {
			var buf bytes.Buffer
			log := logging.New(&buf, logging.Options{Format: format, Secrets: secrets})
			err := fmt.Errorf("send: %w", errors.New("failed to get LID for PN 15551234567@s.whatsapp.net"))
			log.Warn("msg.send failed", "err", err, "to", "987654321098@s.whatsapp.net", slog.Group("g", "e", err))
			out := buf.String()
			if strings.Contains(out, "15551234567") || strings.Contains(out, "987654321098") {
				t.Errorf("%s: a JID is printed whole: %s", format, out)
			}
			if !strings.Contains(out, "1555****567@s.whatsapp.net") || !strings.Contains(out, "9876****098@s.whatsapp.net") {
				t.Errorf("%s: want the masked JIDs: %s", format, out)
			}
			if format == "json" && !json.Valid(bytes.TrimSpace(buf.Bytes())) {
				t.Errorf("json output is not JSON: %s", out)
			}
		}
	}
}
