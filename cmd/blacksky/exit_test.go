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
		"NATS_URL": "nats://u:natspass-one@h1:4222,u:natspass-two@h2:zz",
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, _, stderr := runMain(t, ctx, env, "backup-now", "--timeout", "2s")
	if code != 2 || !strings.Contains(stderr, "NATS_URL") {
		t.Fatalf("backup-now with an unparsable NATS_URL: exit %d, want 2 naming NATS_URL: %s", code, stderr)
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

// Whatever the NATS_URL password holds, no command prints it: a NATS_URL
// nats.go cannot use stops the start naming the variable (exit 2), and
// one it can use is shown without its credentials in logs and errors.
func TestNATSPasswordIsNeverPrinted(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		url  string
		args []string
		code int // -1: any failure
	}{
		{"nats://u:S3cretA@h1:4222,u:S3cretB@h2:bad", []string{"backup-now", "--timeout", "2s"}, 2},
		{"nats://u:S3c+retA/x@h1:4222", []string{"run"}, 2},
		{"nats://u:S3c/retA@h1:4222", []string{"backup-now", "--timeout", "2s"}, 2},
		{"nats://u:S3c#retA@h1:4222", []string{"run"}, 2},
		{"nats://u:S3c%2FretA@127.0.0.1:1,tok-S3cretB@127.0.0.1:2", []string{"backup-now", "--timeout", "2s"}, -1},
		{"nats://u:S3c%2FretA@127.0.0.1:1,tok-S3cretB@127.0.0.1:2", []string{"run"}, -1},
	} {
		t.Run(tt.args[0]+"/"+tt.url, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{"DATA_DIR": t.TempDir(), "NATS_URL": tt.url, "PORT": "0", "SHUTDOWN_TIMEOUT": "2s"}
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
			defer cancel()
			code, stdout, stderr := runMain(t, ctx, env, tt.args...)
			if tt.code >= 0 && code != tt.code {
				t.Errorf("exit %d, want %d: %s", code, tt.code, stderr)
			}
			if tt.code == 2 && !strings.Contains(stderr, "NATS_URL") {
				t.Errorf("the error does not name NATS_URL: %s", stderr)
			}
			if tt.args[0] == "run" && tt.code < 0 && !strings.Contains(stderr, "127.0.0.1:1") {
				t.Errorf("run never named the server it tried: %s", stderr)
			}
			for _, pw := range []string{"S3cretA", "S3cretB", "S3c+retA", "S3c/retA", "S3c#retA", "S3c%2FretA", "S3c"} {
				if strings.Contains(stdout+stderr, pw) {
					t.Fatalf("output shows the password %q:\n%s%s", pw, stdout, stderr)
				}
			}
		})
	}
}
