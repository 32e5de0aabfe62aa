package logging_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

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
