package backup_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/config"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func loadConfig(t *testing.T, env map[string]string) *config.Config {
	t.Helper()
	cfg, err := config.Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// backupConfig maps a loaded configuration into backup's own, as
// cmd/blacksky does: the tests describe instances by their environment.
func backupConfig(c *config.Config) backup.Config {
	kind := "sqlite"
	if c.DatabaseURL != "" {
		kind = "postgres"
	}
	return backup.Config{SessionID: c.SessionID, DataDir: c.DataDir, EncryptionKey: c.SessionEncryptionKey,
		AllowPlaintext: c.AllowPlaintextBackups, Production: c.Production, Heroku: c.Heroku, Interval: c.BackupInterval,
		Retention: c.BackupRetention, RetentionAge: c.BackupRetentionAge, SyncInterval: c.SyncInterval, ShutdownTimeout: c.ShutdownTimeout, DatabaseKind: kind}
}

func clockStart() time.Time { return clockwork.NewFakeClock().Now() }

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
