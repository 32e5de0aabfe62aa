package config_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/config"
)

func env(kv ...string) config.Getenv {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestDefaultsMatchContract(t *testing.T) {
	c, err := config.Load(env())
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"SESSION_ID", c.SessionID, "BLACKSKY-MD"},
		{"BOT_NAME", c.BotName, "BLACKSKY-MD"},
		{"PREFIX", c.Prefix, "."},
		{"PORT", c.Port, 8080},
		{"DATA_DIR", c.DataDir, "./data"},
		{"DATABASE_MAX_CONNS", c.DatabaseMaxConns, 5},
		{"production", c.Production, false},
		{"HEROKU", c.Heroku, false},
		{"ENABLE_HEALTH_CHECK", c.EnableHealthCheck, true},
		{"ENABLE_SESSION_BACKUP", c.EnableSessionBackup, true},
		{"BACKUP_INTERVAL", c.BackupInterval, 30 * time.Minute},
		{"BACKUP_RETENTION", c.BackupRetention, 48},
		{"KEEPAWAKE_INTERVAL", c.KeepAwakeInterval, 25 * time.Minute},
		{"ENABLE_MEMORY_OPTIMIZATION", c.EnableMemoryOptimization, true},
		{"RECONNECT_MIN", c.ReconnectMin, time.Second},
		{"RECONNECT_MAX", c.ReconnectMax, 5 * time.Minute},
		{"SEND_RATE", c.SendRate, config.Rate{N: 20, Per: time.Minute}},
		{"SHUTDOWN_TIMEOUT", c.ShutdownTimeout, 25 * time.Second},
		{"LOG_FORMAT", c.LogFormat, "text"},
		{"NATS_LISTEN", c.NATSListen, "127.0.0.1:4222"},
		{"NATS_LISTEN given", c.NATSListenSet, false},
	}
	for _, ck := range checks {
		if ck.got != ck.want {
			t.Errorf("%s: got %v, want %v", ck.name, ck.got, ck.want)
		}
	}
	if c.SessionEncryptionKey != nil {
		t.Errorf("no key by default")
	}
}

// The seed's Heroku config must keep working unchanged.
func TestSeedEnvironmentWorks(t *testing.T) {
	c, err := config.Load(env(
		"SESSION_ID", "BLACKSKY-MD", "BOT_NAME", "BLACKSKY-MD", "OWNER_NUMBER", "+1 555 123 4567",
		"NODE_ENV", "production", "HEROKU", "true", "HEROKU_APP_URL", "https://my-bot.herokuapp.com",
		"ENABLE_HEALTH_CHECK", "true", "ENABLE_SESSION_BACKUP", "true", "BACKUP_INTERVAL", "30",
		"ENABLE_MEMORY_OPTIMIZATION", "true",
	))
	if err != nil {
		t.Fatal(err)
	}
	if c.OwnerNumber != "15551234567" || !c.Production || !c.Heroku || c.LogFormat != "json" || c.BackupInterval != 30*time.Minute {
		t.Fatalf("unexpected config: %+v", c)
	}
}

func TestValues(t *testing.T) {
	tests := []struct {
		name string
		env  config.Getenv
		ok   func(*config.Config) bool
	}{
		{"interval as duration", env("BACKUP_INTERVAL", "90s"), func(c *config.Config) bool { return c.BackupInterval == 90*time.Second }},
		{"interval as fraction of minutes", env("BACKUP_INTERVAL", "0.5"), func(c *config.Config) bool { return c.BackupInterval == 30*time.Second }},
		{"rate per second", env("SEND_RATE", "3/s"), func(c *config.Config) bool { return c.SendRate.Limit() == 3 }},
		{"rate per hour", env("SEND_RATE", "360/h"), func(c *config.Config) bool { return c.SendRate.Limit() == 0.1 }},
		{"bool yes", env("ENABLE_SESSION_BACKUP", "no", "HEROKU", "YES"), func(c *config.Config) bool { return !c.EnableSessionBackup && c.Heroku }},
		{"DYNO means heroku", env("DYNO", "web.1"), func(c *config.Config) bool { return c.Heroku }},
		{"BLACKSKY_ENV wins", env("NODE_ENV", "production", "BLACKSKY_ENV", "development"), func(c *config.Config) bool { return !c.Production }},
		{"hex key", env("SESSION_ENCRYPTION_KEY", strings.Repeat("ab", 32)), func(c *config.Config) bool { return len(c.SessionEncryptionKey) == 32 }},
		{"base64 key", env("SESSION_ENCRYPTION_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="), func(c *config.Config) bool { return c.SessionEncryptionKey[31] == 31 }},
		{"loopback listen without token", env("NATS_LISTEN", "127.0.0.1:4222"), func(c *config.Config) bool { return c.NATSListen == "127.0.0.1:4222" && c.NATSListenSet }},
		{"internal secret", env("NATS_INTERNAL_SECRET", "0123456789abcdef"), func(c *config.Config) bool { return c.NATSInternalSecret == "0123456789abcdef" }},
		{"open listen with token", env("NATS_LISTEN", "0.0.0.0:4222", "NATS_TOKEN", "s3cret-token"), func(c *config.Config) bool { return c.NATSToken == "s3cret-token" }},
		{"owner with dashes", env("OWNER_NUMBER", "+44 7700-900123"), func(c *config.Config) bool { return c.OwnerNumber == "447700900123" }},
		{"retention as a count", env("BACKUP_RETENTION", "12"), func(c *config.Config) bool { return c.BackupRetention == 12 && c.BackupRetentionAge == 0 }},
		{"retention in days", env("BACKUP_RETENTION", "7d"), func(c *config.Config) bool { return c.BackupRetention == 0 && c.BackupRetentionAge == 7*24*time.Hour }},
		{"retention as a duration", env("BACKUP_RETENTION", "36h"), func(c *config.Config) bool { return c.BackupRetentionAge == 36*time.Hour }},
		{"sync interval default", env(), func(c *config.Config) bool { return c.SyncInterval == time.Second }},
		{"sync interval off", env("SYNC_INTERVAL", "0"), func(c *config.Config) bool { return c.SyncInterval == 0 }},
		{"sync interval", env("SYNC_INTERVAL", "250ms"), func(c *config.Config) bool { return c.SyncInterval == 250*time.Millisecond }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := config.Load(tt.env)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.ok(c) {
				t.Fatalf("unexpected config: %+v", c)
			}
		})
	}
}

func TestErrorsNameTheVariable(t *testing.T) {
	secretKey := "not-a-valid-key-but-secret-anyway"
	tests := []struct {
		env     config.Getenv
		varName string
		says    string // part of the message: what it accepts or what it got
	}{
		{env("BACKUP_INTERVAL", "abc"), "BACKUP_INTERVAL", `got "abc"`},
		{env("BACKUP_INTERVAL", "-5"), "BACKUP_INTERVAL", "to a year"},
		{env("BACKUP_INTERVAL", "NaN"), "BACKUP_INTERVAL", `got "NaN"`},
		{env("BACKUP_INTERVAL", "1e-12"), "BACKUP_INTERVAL", "one second"},
		{env("BACKUP_INTERVAL", "0.0001"), "BACKUP_INTERVAL", "one second"},
		{env("BACKUP_INTERVAL", "5ms"), "BACKUP_INTERVAL", "duration"},
		{env("SEND_RATE", "fast"), "SEND_RATE", `got "fast"`},
		{env("SEND_RATE", "0/m"), "SEND_RATE", "N/s, N/m or N/h"},
		{env("PORT", "70000"), "PORT", "0 to 65535"},
		{env("PORT", "http"), "PORT", `got "http"`},
		{env("OWNER_NUMBER", "call me"), "OWNER_NUMBER", "digits only"},
		{env("OWNER_NUMBER", "+12"), "OWNER_NUMBER", "7 to 15 digits"},
		{env("PAIR_PHONE", "abc"), "PAIR_PHONE", "digits only"},
		{env("ENABLE_HEALTH_CHECK", "maybe"), "ENABLE_HEALTH_CHECK", "true/false"},
		{env("RECONNECT_MIN", "10s", "RECONNECT_MAX", "1s"), "RECONNECT_MAX", "not below RECONNECT_MIN"},
		{env("SHUTDOWN_TIMEOUT", "soon"), "SHUTDOWN_TIMEOUT", "duration"},
		{env("DATABASE_MAX_CONNS", "0"), "DATABASE_MAX_CONNS", "from 1"},
		{env("BACKUP_RETENTION", "many"), "BACKUP_RETENTION", "whole number"},
		{env("BACKUP_RETENTION", "0"), "BACKUP_RETENTION", "from 1 to 100000"},
		{env("BACKUP_RETENTION", "0d"), "BACKUP_RETENTION", "such as 7d"},
		{env("BACKUP_RETENTION", "30s"), "BACKUP_RETENTION", "at least a minute"},
		{env("BACKUP_RETENTION", "-3h"), "BACKUP_RETENTION", "at least a minute"},
		{env("SYNC_INTERVAL", "fast"), "SYNC_INTERVAL", "0 for off"},
		{env("SYNC_INTERVAL", "1ms"), "SYNC_INTERVAL", "at least 100ms"},
		{env("LOG_LEVEL", "loud"), "LOG_LEVEL", "debug, info, warn or error"},
		{env("LOG_FORMAT", "xml"), "LOG_FORMAT", "text or json"},
		{env("HEROKU_APP_URL", "my-bot"), "HEROKU_APP_URL", "http(s) URL"},
		{env("NATS_LISTEN", "0.0.0.0:4222"), "NATS_TOKEN", "not a loopback address"},
		{env("NATS_LISTEN", "nowhere"), "NATS_LISTEN", "host:port"},
		{env("NATS_INTERNAL_SECRET", "short"), "NATS_INTERNAL_SECRET", "at least 16"},
		{env("NATS_INTERNAL_SECRET", secretKey, "NATS_TOKEN", secretKey), "NATS_INTERNAL_SECRET", "other than NATS_TOKEN"},
		{env("SESSION_ENCRYPTION_KEY", secretKey), "SESSION_ENCRYPTION_KEY", "not shown"},
		{env("PREFIX", "a b"), "PREFIX", "non-space"},
		{env("DATABASE_URL", "mysql://root:pw@db/app"), "DATABASE_URL", "not shown"},
	}
	for _, tt := range tests {
		t.Run(tt.varName+"/"+tt.says, func(t *testing.T) {
			_, err := config.Load(tt.env)
			if err == nil {
				t.Fatal("want an error")
			}
			if !config.IsError(err) {
				t.Fatalf("want *config.Error, got %T", err)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.varName+":") || !strings.Contains(msg, tt.says) {
				t.Fatalf("message %q should name %s and say %q", msg, tt.varName, tt.says)
			}
			if strings.Contains(msg, secretKey) {
				t.Fatalf("message leaks the secret: %q", msg)
			}
		})
	}
}

func TestHerokuRequiresDatabase(t *testing.T) {
	c, err := config.Load(env("HEROKU", "true"))
	if err != nil {
		t.Fatal(err)
	}
	err = c.RequireDatabase()
	if err == nil || !strings.Contains(err.Error(), "DATABASE_URL") || !strings.Contains(err.Error(), "heroku-postgresql") {
		t.Fatalf("want an error naming DATABASE_URL and the add-on, got %v", err)
	}
	c, _ = config.Load(env("HEROKU", "true", "DATABASE_URL", "postgres://u:p@h/db"))
	if err := c.RequireDatabase(); err != nil {
		t.Fatal(err)
	}
	c, _ = config.Load(env())
	if err := c.RequireDatabase(); err != nil {
		t.Fatalf("off Heroku the embedded database is fine: %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	tests := []struct{ in, hidden string }{
		{"postgres://user:hunter2@db.example.com:5432/app?sslmode=require", "hunter2"},
		{"nats://tok3nvalue@gateway:4222", "tok3nvalue"},
		{"postgres://db/app?password=hunter2", "hunter2"},
	}
	for _, tt := range tests {
		got := config.RedactURL(tt.in)
		if strings.Contains(got, tt.hidden) {
			t.Errorf("RedactURL(%q) = %q still shows the secret", tt.in, got)
		}
	}
}

func TestSecretsListsEverySecret(t *testing.T) {
	key := strings.Repeat("0f", 32)
	c, err := config.Load(env("DATABASE_URL", "postgres://u:dbpass@h/db", "NATS_TOKEN", "natstoken", "NATS_URL", "nats://urltoken@gw:4222",
		"HEALTH_TOKEN", "healthtoken", "SESSION_ENCRYPTION_KEY", key, "NATS_INTERNAL_SECRET", "internal-secret-16"))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(c.Secrets(), " ")
	for _, want := range []string{"dbpass", "natstoken", "urltoken", "healthtoken", key, "internal-secret-16"} {
		if !strings.Contains(got, want) {
			t.Errorf("Secrets() misses %q", want)
		}
	}
}

func TestEveryVarHasADescription(t *testing.T) {
	seen := map[string]bool{}
	for _, v := range config.Vars {
		if v.Description == "" || seen[v.Name] {
			t.Errorf("%s: empty description or listed twice", v.Name)
		}
		seen[v.Name] = true
	}
}

func TestPostgresURLOnHeroku(t *testing.T) {
	tests := []struct {
		heroku, url, want string
	}{
		{"false", "postgres://u:p@h/db", "postgres://u:p@h/db"},
		{"true", "postgres://u:p@h/db", "postgres://u:p@h/db?sslmode=require"},
		{"true", "postgres://u:p@h/db?sslmode=disable", "postgres://u:p@h/db?sslmode=disable"},
		{"true", "", ""},
	}
	for _, tt := range tests {
		c, err := config.Load(env("HEROKU", tt.heroku, "DATABASE_URL", tt.url))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.PostgresURL(); got != tt.want {
			t.Errorf("HEROKU=%s %q: got %q, want %q", tt.heroku, tt.url, got, tt.want)
		}
	}
}

// compose's local default (blacksky:blacksky) is no secret; redacting it would
// turn every "blacksky_snapshots" in a log into "[redacted]_snapshots".
func TestPasswordEqualToUserIsNotASecret(t *testing.T) {
	c, err := config.Load(env("DATABASE_URL", "postgres://blacksky:blacksky@postgres:5432/blacksky"))
	if err != nil {
		t.Fatal(err)
	}
	if s := c.Secrets(); len(s) != 0 {
		t.Fatalf("Secrets() = %q", s)
	}
}

func TestEnvironmentName(t *testing.T) {
	for _, tt := range []struct {
		env        config.Getenv
		production bool
		badVar     string
	}{
		{env(), false, ""},
		{env("NODE_ENV", "test"), false, ""},
		{env("NODE_ENV", "Production"), true, ""},
		{env("NODE_ENV", "development", "BLACKSKY_ENV", "production"), true, ""},
		// A typo must not quietly run as development (open /pair, text logs).
		{env("NODE_ENV", "prod"), false, "NODE_ENV"},
		{env("NODE_ENV", "production", "BLACKSKY_ENV", "staging"), false, "BLACKSKY_ENV"},
	} {
		c, err := config.Load(tt.env)
		if tt.badVar != "" {
			if !config.IsError(err) || !strings.Contains(err.Error(), tt.badVar+":") || !strings.Contains(err.Error(), "development, production or test") {
				t.Errorf("%s: want a config error naming it and the accepted values, got %v", tt.badVar, err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if c.Production != tt.production {
			t.Errorf("Env %q: Production = %v, want %v", c.Env, c.Production, tt.production)
		}
	}
}

// NATS_URL may list several servers: each one's credentials are secrets,
// with or without a scheme (nats.go adds nats://), whatever characters the
// password holds, and each whole server holding credentials too (nats.go's
// errors quote one whole).
func TestSecretsSplitsANATSServerList(t *testing.T) {
	for _, tt := range []struct {
		raw    string
		secret []string
		loads  bool
	}{
		{"nats://u:pass-one@h1:4222,nats://u:pass-two@h2:4222", []string{"pass-one", "pass-two"}, true},
		{"nats://u:pass-one@h1:4222,u:pass-two@h2:4222", []string{"pass-one", "pass-two", "u:pass-two@h2:4222"}, true},
		{"tok-one@h1, nats://tok-two@h2", []string{"tok-one", "tok-two", "tok-one@h1"}, true},
		{"nats://u:pass-one@h1:4222, nats://u:pass-two@h2:zz", []string{"pass-one", "pass-two"}, false},
		{"nats://u:S3cretA@h1:4222,u:S3cretB@h2:bad", []string{"S3cretA", "S3cretB", "u:S3cretB@h2:bad"}, false},
		{"nats://u:S3c+retA/x@h1:4222", []string{"S3c+retA/x", "nats://u:S3c+retA/x@h1:4222"}, false},
		{"nats://u:S3c/retA@h1:4222", []string{"S3c/retA"}, false},
		{"nats://u:a#b?c@h1:4222", []string{"a#b?c"}, false},
		{"nats://tok#en@h1:4222", []string{"tok#en"}, false},
	} {
		c, err := config.Load(env("NATS_URL", tt.raw))
		sets := [][]string{config.EnvSecrets(env("NATS_URL", tt.raw))}
		switch {
		case tt.loads && err != nil:
			t.Fatalf("NATS_URL %q: %v", tt.raw, err)
		case tt.loads:
			sets = append(sets, c.Secrets())
		case err == nil:
			t.Errorf("NATS_URL %q loaded; want a config error", tt.raw)
		}
		for _, got := range sets {
			for _, want := range tt.secret {
				if !slices.Contains(got, want) {
					t.Errorf("NATS_URL %q: secrets %q miss %q", tt.raw, got, want)
				}
			}
		}
	}
}

// A NATS_URL server that nats.go cannot use stops the start naming
// NATS_URL and which server, never showing the value: url.Parse's own error
// quotes it, password included.
func TestNATSURLIsCheckedServerByServer(t *testing.T) {
	for _, tt := range []struct{ raw, says string }{
		{"nats://u:S3cretA@h1:4222,u:S3cretB@h2:bad", "server 2 of 2"},
		{"nats://u:S3c+retA/x@h1:4222", "server 1 of 1"},
		{"nats://u:S3cretA@h1:4222,,u:S3cretB@h3:x", "server 3 of 3"},
		{" , ", "no server"},
		{"http://u:S3cretA@h1:4222", "scheme"},
		{"nats://u:S3cretA@:4222", "no host"},
		{"nats://u:S3cretA@h1:99999", "port"},
	} {
		_, err := config.Load(env("NATS_URL", tt.raw))
		if !config.IsError(err) {
			t.Errorf("NATS_URL %q: want a config error, got %v", tt.raw, err)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, "NATS_URL:") || !strings.Contains(msg, tt.says) || !strings.Contains(msg, "not shown") {
			t.Errorf("NATS_URL %q: message %q should name NATS_URL, say %q and not show the value", tt.raw, msg, tt.says)
		}
		if strings.Contains(msg, "S3cret") || strings.Contains(msg, "h1") {
			t.Errorf("NATS_URL %q: message shows the value: %q", tt.raw, msg)
		}
	}
	for _, ok := range []string{"nats://127.0.0.1:4222", "h1,h2:4223", "tls://tok@h1", "nats://u:p%2Fw@h1:4222", "nats://h1:4222,"} {
		if _, err := config.Load(env("NATS_URL", ok)); err != nil {
			t.Errorf("NATS_URL %q: %v", ok, err)
		}
	}
}

// In production a short HEALTH_TOKEN is refused (exit 2 naming it); none at
// all keeps the pages closed, which is allowed.
func TestProductionRefusesAShortHealthToken(t *testing.T) {
	for _, tc := range []struct {
		env, token string
		ok         bool
	}{
		{"production", "short-token", false},
		{"production", strings.Repeat("x", 15), false},
		{"production", strings.Repeat("x", 16), true},
		{"production", "", true},
		{"development", "short", true},
	} {
		_, err := config.Load(env("NODE_ENV", tc.env, "HEALTH_TOKEN", tc.token))
		if tc.ok != (err == nil) {
			t.Errorf("%s with a %d-character HEALTH_TOKEN: %v", tc.env, len(tc.token), err)
			continue
		}
		if err != nil && (!config.IsError(err) || !strings.Contains(err.Error(), "HEALTH_TOKEN") || strings.Contains(err.Error(), tc.token)) {
			t.Errorf("error %q: want a config error naming HEALTH_TOKEN, not showing it", err)
		}
	}
}

func TestSandboxIsRefusedInProduction(t *testing.T) {
	c, err := config.Load(env("WHATSAPP_SANDBOX", "true", "SANDBOX_SEED", "abc"))
	if err != nil || !c.WhatsAppSandbox || c.SandboxSeed != "abc" {
		t.Fatalf("development sandbox: %+v %v", c, err)
	}
	for _, prod := range [][]string{{"NODE_ENV", "production"}, {"BLACKSKY_ENV", "production"}} {
		_, err := config.Load(env("WHATSAPP_SANDBOX", "yes", prod[0], prod[1]))
		var ce *config.Error
		if !errors.As(err, &ce) || ce.Var != "WHATSAPP_SANDBOX" || ce.Got != `"yes"` {
			t.Errorf("%s=production with the sandbox: %v, want an error naming WHATSAPP_SANDBOX and the value given", prod[0], err)
		}
	}
}

// TestSandboxSeedIsNotShownInErrors: the seed derives the sandbox device's
// keys; a refused one is described, not printed.
func TestSandboxSeedIsNotShownInErrors(t *testing.T) {
	seed := strings.Repeat("s3cr", 65)
	_, err := config.Load(env("WHATSAPP_SANDBOX", "true", "SANDBOX_SEED", seed))
	var ce *config.Error
	if !errors.As(err, &ce) || ce.Var != "SANDBOX_SEED" || strings.Contains(err.Error(), "s3cr") {
		t.Errorf("a too long seed: %v, want an error naming SANDBOX_SEED without its value", err)
	}
}
