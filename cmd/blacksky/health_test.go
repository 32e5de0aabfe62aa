package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestHealthcheck(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	}))
	defer ok.Close()
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer down.Close()
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close()
	okPort := ok.Listener.Addr().(*net.TCPAddr).Port

	tests := []struct {
		name string
		env  map[string]string
		args []string
		code int
		out  string
	}{
		{"default url from PORT", map[string]string{"PORT": strconv.Itoa(okPort)}, nil, 0, "ok"},
		{"--url answers 200", nil, []string{"--url", ok.URL + "/healthz"}, 0, "ok"},
		{"unrelated bad env is ignored", map[string]string{"SEND_RATE": "fast", "PORT": strconv.Itoa(okPort)}, nil, 0, "ok"},
		{"bad PORT falls back, --url wins", map[string]string{"PORT": "not-a-port"}, []string{"--url", ok.URL + "/healthz"}, 0, "ok"},
		{"503 fails", nil, []string{"--url", down.URL + "/healthz"}, 1, "503"},
		{"404 fails", nil, []string{"--url", ok.URL + "/nope"}, 1, "404"},
		{"nothing listening fails", nil, []string{"--url", closedURL + "/healthz"}, 1, "healthcheck"},
		{"not a URL is a usage error", nil, []string{"--url", "ftp://x"}, 2, "--url"},
		{"credentials in the URL are not echoed", nil, []string{"--url", "http://u:hunter2@" + strings.TrimPrefix(closedURL, "http://") + "/healthz"}, 1, "xxxxx"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"healthcheck", "--timeout", "5s"}, tt.args...)
			code, stdout, stderr := runMain(t, context.Background(), tt.env, args...)
			if code != tt.code || !strings.Contains(stdout+stderr, tt.out) {
				t.Fatalf("exit %d (want %d), output %q (want %q)", code, tt.code, stdout+stderr, tt.out)
			}
			if strings.Contains(stdout+stderr, "hunter2") {
				t.Fatal("a password was printed")
			}
		})
	}
}

// TestHealthRole runs `blacksky health` against NATS on a TCP port, as
// docker compose does, and reads its endpoints.
func TestHealthRole(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: "role-test-token", InternalSecret: "role-test-internal-secret"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // the role binds it again itself

	env := map[string]string{
		"PORT": strconv.Itoa(port), "NATS_URL": srv.ClientURL(), "NATS_TOKEN": "role-test-token", "NATS_INTERNAL_SECRET": "role-test-internal-secret",
		"HEALTH_TOKEN": "role-health-token", "SESSION_ID": "Role Test",
	}
	ready := make(chan ReadyInfo, 1)
	var stderr testlog.Buffer
	m := &Main{Stdout: io.Discard, Stderr: &stderr, Getenv: func(k string) string { return env[k] },
		Ready: func(info ReadyInfo) { ready <- info }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, []string{"health"}) }()
	var info ReadyInfo
	select {
	case info = <-ready:
	case err := <-done:
		t.Fatalf("health role stopped: %v\n%s", err, stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatal("health role not ready in 20 s")
	}
	_, p, _ := net.SplitHostPort(info.HTTPAddr)
	base := "http://127.0.0.1:" + p

	get := func(path string, hdr ...string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if len(hdr) == 2 {
			req.Header.Set(hdr[0], hdr[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz = %d %q", code, body)
	}
	if code, _, _ := runMain(t, context.Background(), env, "healthcheck"); code != 0 {
		t.Fatalf("healthcheck against the role = exit %d", code)
	}
	// Health's own heartbeat makes the round trip through NATS; the gateway
	// and backup are not running, so not ready, with reasons.
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := get("/readyz")
		var doc struct {
			Reasons []string `json:"reasons"`
		}
		_ = json.Unmarshal([]byte(body), &doc)
		healthSeen := !strings.Contains(body, "health: no heartbeat yet")
		if code == 503 && healthSeen && strings.Contains(body, "gateway: no heartbeat yet") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz = %d %s", code, body)
		}
		<-time.After(20 * time.Millisecond)
	}
	code, body := get("/status", "Authorization", "Bearer role-health-token")
	if code != 200 || !strings.Contains(body, `"session": "Role Test"`) || !strings.Contains(body, `"detail": "full"`) {
		t.Fatalf("/status = %d %s", code, body)
	}
	if strings.Contains(body, "role-test-token") || strings.Contains(stderr.String(), "role-test-token") ||
		strings.Contains(stderr.String(), "role-health-token") {
		t.Fatal("a token leaked into /status or the logs")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("health role returned %v after SIGTERM-like cancel", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("health role did not stop")
	}
}

// TestHealthRoleOnHerokuWithNATSDown: `blacksky health` answers /healthz at
// once while NATS is unreachable, and on Heroku (DYNO set) sends the pair
// page over plain http to https.
func TestHealthRoleOnHerokuWithNATSDown(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	natsURL := "nats://" + dead.Addr().String()
	dead.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // the role binds it again itself

	env := map[string]string{
		"PORT": strconv.Itoa(port), "NATS_URL": natsURL, "HEALTH_TOKEN": "role-health-token", "NATS_INTERNAL_SECRET": "role-test-internal-secret",
		"SESSION_ID": "Heroku Test", "DYNO": "web.1", "HEROKU_APP_URL": "https://my-bot.herokuapp.com",
	}
	ready := make(chan ReadyInfo, 1)
	var stderr testlog.Buffer
	m := &Main{Stdout: io.Discard, Stderr: &stderr, Getenv: func(k string) string { return env[k] },
		Ready: func(info ReadyInfo) { ready <- info }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- m.Run(ctx, []string{"health"}) }()
	var info ReadyInfo
	select {
	case info = <-ready:
	case err := <-done:
		t.Fatalf("health role stopped: %v\n%s", err, stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatal("health role not ready in 20 s")
	}
	_, p, _ := net.SplitHostPort(info.HTTPAddr)
	base := "http://127.0.0.1:" + p
	client := &http.Client{Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/healthz with NATS down = %d", resp.StatusCode)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("/healthz answered %s after start with NATS down, want within a few seconds", d)
	}

	req, _ := http.NewRequest(http.MethodGet, base+"/pair", nil)
	req.Host = "evil.example" // the redirect goes to HEROKU_APP_URL's host, whatever the request names
	req.Header.Set("X-Forwarded-Proto", "http")
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != "https://my-bot.herokuapp.com/pair" {
		t.Fatalf("/pair over http on Heroku = %d to %q, want 308 to https", resp.StatusCode, resp.Header.Get("Location"))
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("health role returned %v after cancel", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("health role did not stop")
	}
}

// With PORT=0 the not-linked hint names the port the health service
// actually listens on, not port 0.
func TestNotLinkedHintNamesTheBoundPort(t *testing.T) {
	env := map[string]string{"DATA_DIR": t.TempDir(), "PORT": "0", "ENABLE_SESSION_BACKUP": "false",
		"RECONNECT_MIN": "1s", "RECONNECT_MAX": "5s", "SHUTDOWN_TIMEOUT": "10s"}
	info, logs, stop := startDefault(t, env, "127.0.0.1:0", "run")
	_, port, err := net.SplitHostPort(info.HTTPAddr)
	if err != nil || port == "0" {
		t.Fatalf("health listens on %q (%v)", info.HTTPAddr, err)
	}
	want := "not linked: open http://localhost:" + port + "/pair"
	testwait.For(t, 20*time.Second, "the not-linked hint", func() bool { return strings.Contains(logs.String(), want) })
	if strings.Contains(logs.String(), "localhost:0/") {
		t.Fatalf("a hint names port 0:\n%s", logs.String())
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
