package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/logging"
)

// commandFlags are the flags each command's --help must list.
var commandFlags = map[string][]string{
	"backup-now":  {"-reason", "-timeout"},
	"messages":    {"-after", "-limit", "-timeout"},
	"deliveries":  {"-timeout"},
	"restore":     {"-id", "-force"},
	"healthcheck": {"-url", "-timeout"},
	"sandbox":     {"--phone", "--from", "--count", "--rate"},
}

func TestEveryCommandHasHelp(t *testing.T) {
	if len(commands) < 10 {
		t.Fatalf("only %d commands listed", len(commands))
	}
	for _, c := range commands {
		for _, args := range [][]string{{c.name, "--help"}, {c.name, "-h"}, {"help", c.name}} {
			// No environment at all: help must not need a valid one.
			code, stdout, stderr := runMain(t, context.Background(), map[string]string{"NODE_ENV": "nonsense"}, args...)
			if code != 0 {
				t.Fatalf("%v: exit %d, want 0 (stderr %s)", args, code, stderr)
			}
			if !strings.HasPrefix(stdout, "usage: blacksky "+c.name) || !strings.Contains(stdout, c.about) {
				t.Fatalf("%v: stdout %q, want the command's usage", args, stdout)
			}
			for _, f := range commandFlags[c.name] {
				if !strings.Contains(stdout, f) {
					t.Errorf("%v: usage does not list %s: %s", args, f, stdout)
				}
			}
			if len(commandFlags[c.name]) == 0 && !strings.Contains(stdout, "No flags") {
				t.Errorf("%v: a command without flags should say so: %s", args, stdout)
			}
		}
	}
}

func TestStartRefusesBadEnvironment(t *testing.T) {
	file := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		env  map[string]string
		args []string
		says []string
	}{
		{"NODE_ENV typo", map[string]string{"NODE_ENV": "prod"}, []string{"run"}, []string{"NODE_ENV:", `"prod"`, "development, production or test"}},
		{"BLACKSKY_ENV typo", map[string]string{"BLACKSKY_ENV": "staging"}, []string{"gateway"}, []string{"BLACKSKY_ENV:", `"staging"`}},
		{"DATA_DIR a file: run", map[string]string{"DATA_DIR": file}, []string{"run"}, []string{"DATA_DIR:", file, "is a file"}},
		{"DATA_DIR a file: gateway", map[string]string{"DATA_DIR": file}, []string{"gateway"}, []string{"DATA_DIR:", file, "is a file"}},
		{"DATA_DIR a file: backup", map[string]string{"DATA_DIR": file}, []string{"backup"}, []string{"DATA_DIR:", file, "is a file"}},
		{"DATA_DIR a file: restore", map[string]string{"DATA_DIR": file}, []string{"restore"}, []string{"DATA_DIR:", file, "is a file"}},
		{"DATA_DIR a file: migrate on SQLite", map[string]string{"DATA_DIR": file}, []string{"migrate"}, []string{"DATA_DIR:", file, "is a file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			code, stdout, stderr := runMain(t, ctx, tt.env, tt.args...)
			if code != 2 {
				t.Fatalf("exit %d, want 2\n%s%s", code, stdout, stderr)
			}
			for _, s := range tt.says {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr does not say %q: %s", s, stderr)
				}
			}
		})
	}
}

func TestTakenPortIsNamed(t *testing.T) {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code, _, stderr := runMain(t, ctx, map[string]string{"PORT": port, "DATA_DIR": t.TempDir(), "ENABLE_SESSION_BACKUP": "false"}, "run")
	if code != 2 || !strings.Contains(stderr, "PORT:") || !strings.Contains(stderr, port) || !strings.Contains(stderr, "already in use") {
		t.Fatalf("exit %d, stderr %s; want 2 naming PORT, %s and that it is in use", code, stderr, port)
	}
}

func TestProductionWithoutHealthTokenWarns(t *testing.T) {
	for _, tt := range []struct {
		env  map[string]string
		role string
		warn bool
	}{
		{map[string]string{"NODE_ENV": "production", "ALLOW_PLAINTEXT_BACKUPS": "true"}, "run", true},
		{map[string]string{"NODE_ENV": "production"}, "health", true},
		{map[string]string{"NODE_ENV": "production", "HEALTH_TOKEN": "a-long-random-token"}, "run", false},
		{map[string]string{}, "run", false},
		{map[string]string{"NODE_ENV": "production"}, "backup-now", false}, // serves no pages
	} {
		tt.env["DATA_DIR"] = t.TempDir()
		var stderr bytes.Buffer
		m := &Main{Stdout: &bytes.Buffer{}, Stderr: &stderr, Getenv: func(k string) string { return tt.env[k] }}
		if _, err := m.setup(tt.role); err != nil {
			t.Fatal(err)
		}
		got := strings.Contains(stderr.String(), "HEALTH_TOKEN is not set") && strings.Contains(stderr.String(), "403")
		if got != tt.warn {
			t.Errorf("%s with %v: warned %v, want %v: %s", tt.role, tt.env, got, tt.warn, stderr.String())
		}
	}
}

func TestPairURL(t *testing.T) {
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"PORT": "8080"}, "http://localhost:8080/pair"},
		{map[string]string{"PORT": "3000", "HEROKU_APP_URL": "https://my-bot.herokuapp.com/"}, "https://my-bot.herokuapp.com/pair"},
	} {
		m := &Main{Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}, Getenv: func(k string) string { return tt.env[k] }}
		a, err := m.setup("health")
		if err != nil {
			t.Fatal(err)
		}
		if a.pairURL != tt.want {
			t.Errorf("%v: pair URL %q, want %q", tt.env, a.pairURL, tt.want)
		}
	}
}

// failing is a service that stops by itself with err.
type failing struct{ err error }

func (f failing) Run(context.Context) error { return f.err }

func TestServiceErrorsNamedOnce(t *testing.T) {
	for _, tt := range []struct{ err, want string }{
		{"backup: DATA_DIR: mkdir /data: permission denied", "backup: DATA_DIR: mkdir /data: permission denied"},
		{"open session store: disk I/O error", "backup: open session store: disk I/O error"},
	} {
		sup := newSupervisor(logging.Discard())
		sup.start("backup", failing{errors.New(tt.err)})
		err := sup.wait(context.Background(), time.Second)
		if err == nil || err.Error() != tt.want {
			t.Errorf("wait = %v, want %q", err, tt.want)
		}
	}
}
