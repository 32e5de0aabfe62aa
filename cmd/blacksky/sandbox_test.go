package main

import (
	"context"
	"strings"
	"testing"
)

func TestSandboxCommandAndVariableErrorsExit2(t *testing.T) {
	for _, c := range []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"no subcommand", nil, []string{"sandbox"}, "a command is required"},
		{"unknown subcommand", nil, []string{"sandbox", "teleport"}, "unknown command"},
		{"fault without a kind", nil, []string{"sandbox", "fault", "--code", "1"}, "kind comes first"},
		{"bad flag", nil, []string{"sandbox", "inject", "--count", "many"}, "invalid value"},
		{"receipt without an id", nil, []string{"sandbox", "receipt", "--type", "read"}, "--id is required"},
		{"sandbox in production", map[string]string{"WHATSAPP_SANDBOX": "true", "NODE_ENV": "production"}, []string{"run"}, "WHATSAPP_SANDBOX"},
	} {
		code, _, stderr := runMain(t, context.Background(), c.env, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%s: exit %d, stderr %q; want 2 and %q", c.name, code, stderr, c.want)
		}
	}
}

func TestSandboxCommandSaysWhenNothingAnswers(t *testing.T) {
	env := map[string]string{"NATS_URL": "nats://127.0.0.1:1", "DATA_DIR": t.TempDir()}
	code, _, stderr := runMain(t, context.Background(), env, "sandbox", "link", "--timeout", "2s")
	if code != 1 || !strings.Contains(stderr, "NATS") {
		t.Errorf("no bus: exit %d, stderr %q; want 1 and a word about NATS", code, stderr)
	}
}
