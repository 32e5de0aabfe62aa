package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// runMain runs the real Main with env and returns its exit code and output.
func runMain(t *testing.T, ctx context.Context, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	getenv := func(k string) string { return env[k] }
	m := &Main{Stdout: &stdout, Stderr: &stderr, Getenv: getenv}
	err := m.Run(ctx, args)
	if err != nil {
		stderr.WriteString(exitMessage(err, getenv) + "\n") // as main does
	}
	return ExitCode(err), stdout.String(), stderr.String()
}

func TestExitCodes(t *testing.T) {
	tests := []struct {
		name   string
		env    map[string]string
		args   []string
		code   int
		output string
	}{
		{"version", nil, []string{"version"}, 0, "blacksky dev"},
		{"help", nil, []string{"help"}, 0, "commands:"},
		{"--help", nil, []string{"--help"}, 0, "commands:"},
		{"-h", nil, []string{"-h"}, 0, "commands:"},
		{"unknown command", nil, []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"bad flag", nil, []string{"version", "--nope"}, 2, "flag provided but not defined"},
		{"bad interval", map[string]string{"BACKUP_INTERVAL": "abc"}, []string{"run"}, 2, "BACKUP_INTERVAL"},
		{"bad rate", map[string]string{"SEND_RATE": "fast"}, []string{"gateway"}, 2, "SEND_RATE"},
		{"bad port", map[string]string{"PORT": "70000"}, []string{"health"}, 2, "PORT"},
		{"heroku without database", map[string]string{"HEROKU": "true"}, []string{"run"}, 2, "heroku-postgresql"},
		{"open listen without token", map[string]string{"NATS_LISTEN": "0.0.0.0:4222"}, []string{"gateway"}, 2, "NATS_TOKEN"},
		{"secret key never echoed", map[string]string{"SESSION_ENCRYPTION_KEY": "my-secret-passphrase"}, []string{"run"}, 2, "not shown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runMain(t, context.Background(), tt.env, tt.args...)
			if code != tt.code {
				t.Fatalf("exit code %d, want %d (stderr: %s)", code, tt.code, stderr)
			}
			if out := stdout + stderr; !strings.Contains(out, tt.output) {
				t.Fatalf("output %q does not contain %q", out, tt.output)
			}
			if strings.Contains(stdout+stderr, "my-secret-passphrase") {
				t.Fatal("a secret was printed")
			}
		})
	}
}

// Two processes must never share a lease identity: on a Heroku preboot both
// dynos are called web.1.
func TestInstanceIsUniquePerProcessStart(t *testing.T) {
	m := &Main{Getenv: func(k string) string { return map[string]string{"DYNO": "web.1"}[k] }}
	a, b := m.instance("run"), m.instance("run")
	if a == b || !strings.HasPrefix(a, "web.1-") {
		t.Fatalf("instances %q and %q", a, b)
	}
}
