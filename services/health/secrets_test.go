package health

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
)

func TestMaskJID(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"15551234567@s.whatsapp.net", "1555****567"},
		{"15551234567:12@s.whatsapp.net", "1555****567"},
		{"15551234567.0:12@s.whatsapp.net", "1555****567"},
		{"15551234567", "1555****567"},
		{"123456789012345@lid", "1234****345"},
		{"1234567@s.whatsapp.net", "12****67"},
		{"1234", "****"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := MaskJID(tt.in); got != tt.want {
			t.Errorf("MaskJID(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestNoSecretInStatusOrMetrics loads a config full of secrets the way cmd
// does, then feeds the service events whose text quotes them (a careless
// error message, a bad reason), and reads every endpoint.
func TestNoSecretInStatusOrMetrics(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"DATABASE_URL":           "postgres://bot:s3cr3t-db-passw0rd@db.example.com:5432/bot?sslmode=require",
		"NATS_TOKEN":             "nats-token-5f2c9a7e1b",
		"HEALTH_TOKEN":           "health-token-9d8c7b6a5f4e",
		"SESSION_ENCRYPTION_KEY": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
	}
	cfg, err := config.Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	secrets := cfg.Secrets()
	if len(secrets) < 5 {
		t.Fatalf("config gave %d secrets, want db password, two tokens and the key in two forms", len(secrets))
	}
	b := setup(t, func(o *Options) {
		o.Token = cfg.HealthToken
		o.Secrets = secrets
		o.PairPhone = "15557654321"
	})
	since := b.clock.Now().UTC()
	b.beat(t, bus.ServiceGateway, "web.1", bus.StateConnected, bus.GatewayDetails{
		WAState: bus.StateConnected, JID: "15551234567:1@s.whatsapp.net", ConnectedSince: &since,
		LastDisconnect: "stream error: token " + cfg.NATSToken})
	b.beat(t, bus.ServiceBackup, "web.1", bus.StateDegraded, bus.BackupDetails{
		Database: "postgres", LastError: "dial " + env["DATABASE_URL"] + " refused; key " + env["SESSION_ENCRYPTION_KEY"]})
	b.send(t, b.subj.BackupFailed(), "backup", bus.BackupFailed{Event: b.event(), Reason: cfg.HealthToken,
		Error: "connect postgres://bot:s3cr3t-db-passw0rd@db/bot: refused (NATS " + cfg.NATSToken + ")", Attempt: 1})
	b.send(t, b.subj.BackupDone(), "backup", bus.BackupDone{Event: b.event(), SnapshotID: 7, Reason: cfg.NATSToken, Bytes: 10})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnConnectFailure, Reason: "bad key " + env["SESSION_ENCRYPTION_KEY"]})

	auth := bearer(cfg.HealthToken)
	bodies := map[string]string{}
	for _, path := range []string{"/status", "/metrics", "/readyz", "/pair/state", "/pair", "/healthz"} {
		for _, hdr := range []map[string]string{nil, auth} {
			_, body, _ := b.get(t, path, hdr)
			bodies[path+" "+strings.Join(mapKeys(hdr), ",")] = body
		}
	}
	sawDetail := false
	for name, body := range bodies {
		for _, s := range secrets {
			if strings.Contains(body, s) {
				t.Errorf("%s shows a secret (%d chars): %s", name, len(s), body)
			}
		}
		if strings.Contains(body, "15551234567") {
			t.Errorf("%s shows the whole JID", name)
		}
		if strings.Contains(body, "[redacted]") {
			sawDetail = true
		}
	}
	if !sawDetail {
		t.Error("the detailed status never showed the (redacted) error text: the test did not reach it")
	}
}

func mapKeys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestKeepAwake(t *testing.T) {
	t.Parallel()
	var hits atomic.Int64
	var paths atomic.Value
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths.Store(r.URL.Path + " " + r.Header.Get("User-Agent"))
		hits.Add(1)
		_, _ = w.Write([]byte("ok\n"))
	}))
	defer app.Close()
	b := setup(t, func(o *Options) {
		o.KeepAwakeURL = app.URL + "/"
		o.KeepAwakeInterval = 25 * time.Minute
	})
	ctx := t.Context()
	// Two tickers wait on the clock: health's heartbeat and the keep-awake.
	if err := b.clock.BlockUntilContext(ctx, 2); err != nil {
		t.Fatal(err)
	}
	b.advance(t, 24*time.Minute)
	if n := hits.Load(); n != 0 {
		t.Fatalf("%d pings before the interval", n)
	}
	b.advance(t, time.Minute)
	testwait.For(t, 5*time.Second, "the first keep-awake ping", func() bool { return hits.Load() == 1 })
	if p := paths.Load(); p != "/healthz blacksky-keepawake" {
		t.Errorf("ping = %q, want GET /healthz", p)
	}
	b.advance(t, 25*time.Minute)
	testwait.For(t, 5*time.Second, "the second keep-awake ping", func() bool { return hits.Load() == 2 })
	testwait.For(t, 5*time.Second, "the ping counter", func() bool {
		_, m, _ := b.get(t, "/metrics", nil)
		return strings.Contains(m, `blacksky_keepawake_pings_total{result="ok"} 2`)
	})
}

func TestKeepAwakeOffWithoutHealthCheck(t *testing.T) {
	t.Parallel()
	var hits atomic.Int64
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { hits.Add(1) }))
	defer app.Close()
	var logs testlog.Buffer
	b := setup(t, func(o *Options) {
		o.HealthCheck = false
		o.KeepAwakeURL = app.URL
		o.KeepAwakeInterval = time.Minute
		o.Log = logs.Logger()
	})
	// Run logs whether keep-awake is on before it serves; an answered request
	// means that decision is behind us.
	if code, _, _ := b.get(t, "/healthz", nil); code != 200 {
		t.Fatal("not serving")
	}
	if strings.Contains(logs.String(), "keep-awake on") {
		t.Fatal("keep-awake started with ENABLE_HEALTH_CHECK=false")
	}
	b.advance(t, time.Minute)
	if hits.Load() != 0 {
		t.Fatalf("%d keep-awake pings with ENABLE_HEALTH_CHECK=false", hits.Load())
	}
}
