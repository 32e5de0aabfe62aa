package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// The line printed at exit hides every secret of the environment, also in
// errors a library wrote and when NATS_URL lists several servers.
func TestExitMessageHidesSecrets(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"DATA_DIR": t.TempDir(),
		"NATS_URL": "nats://u:natspass-one@h1:4222,nats://u:natspass-two@h2:zz",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, _, stderr := runMain(t, ctx, env, "backup-now", "--timeout", "2s")
	if code == 0 {
		t.Fatalf("backup-now with an unparsable NATS_URL succeeded: %s", stderr)
	}
	for _, pw := range []string{"natspass-one", "natspass-two"} {
		if strings.Contains(stderr, pw) {
			t.Errorf("exit message shows a NATS password: %s", stderr)
		}
	}

	more := map[string]string{
		"NATS_TOKEN": "tok-0123456789", "HEALTH_TOKEN": "health-0123456789", "DATABASE_URL": "postgres://u:dbpass-x@h/db",
		"SESSION_ENCRYPTION_KEY": strings.Repeat("ab", 32),
	}
	getenv := func(k string) string { return more[k] }
	err := errors.New("failed with tok-0123456789, health-0123456789, " + more["DATABASE_URL"] + " and key " + more["SESSION_ENCRYPTION_KEY"])
	msg := exitMessage(err, getenv)
	for _, s := range []string{"tok-0123456789", "health-0123456789", "dbpass-x", strings.Repeat("ab", 32)} {
		if strings.Contains(msg, s) {
			t.Errorf("exit message %q shows %q", msg, s)
		}
	}
}
