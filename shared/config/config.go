// Package config turns the environment of CONTRACT section 2 into one typed,
// validated Config; a bad value is an *Error naming the variable, what it
// accepts and what it got (never the value of a secret).
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"golang.org/x/time/rate"
)

// Config is the whole environment, parsed. Zero values are never used as
// defaults here: Load fills every field from Vars.
type Config struct {
	SessionID   string
	BotName     string
	OwnerNumber string // digits only
	Prefix      string
	Port        int
	DataDir     string

	DatabaseURL      string // secret: never log it, use RedactURL
	DatabaseMaxConns int

	NATSURL    string // secret when it carries credentials
	NATSListen string
	// NATSListenSet: NATS_LISTEN was given, so a taken port is an error
	// instead of a reason to pick a free one.
	NATSListenSet      bool
	NATSToken          string // secret
	NATSInternalSecret string // secret

	Env        string // EnvDevelopment, EnvProduction or EnvTest
	Production bool   // Env is EnvProduction: see CONTRACT "What production changes"
	Heroku     bool

	HerokuAppURL      string
	KeepAwakeInterval time.Duration
	EnableHealthCheck bool

	EnableSessionBackup   bool
	BackupInterval        time.Duration
	BackupRetention       int           // a count; 0 when BACKUP_RETENTION is an age
	BackupRetentionAge    time.Duration // BACKUP_RETENTION as an age (7d); 0 when a count
	SyncInterval          time.Duration // continuous replication; 0: off
	SessionEncryptionKey  []byte        // 32 bytes or nil; secret
	AllowPlaintextBackups bool

	EnableMemoryOptimization bool
	HealthToken              string // secret
	PairPhone                string // digits only
	WhatsAppSandbox          bool
	SandboxSeed              string

	ReconnectMin    time.Duration
	ReconnectMax    time.Duration
	SendRate        Rate
	ShutdownTimeout time.Duration

	MessageRetention time.Duration
	NATSJetStream    bool
	WebhookURL       string // secret: its userinfo and query may hold credentials
	WebhookSecret    string // secret
	WebhookEvents    []string
	WebhookRetryFor  time.Duration

	LogLevel  slog.Level
	LogFormat string // "text" or "json"
}

// The values NODE_ENV and BLACKSKY_ENV accept.
const (
	EnvDevelopment = "development"
	EnvProduction  = "production"
	EnvTest        = "test"
)

// Rate is a SEND_RATE value: N events per Per.
type Rate struct {
	N   int
	Per time.Duration
}

// Limit converts r for golang.org/x/time/rate.
func (r Rate) Limit() rate.Limit { return rate.Limit(float64(r.N) / r.Per.Seconds()) }

func (r Rate) String() string {
	unit := map[time.Duration]string{time.Second: "s", time.Minute: "m", time.Hour: "h"}[r.Per]
	return fmt.Sprintf("%d/%s", r.N, unit)
}

// Error is a configuration error: exit code 2, the variable named.
type Error struct {
	Var     string
	Accepts string
	Got     string // already redacted for secrets
}

func (e *Error) Error() string {
	return fmt.Sprintf("config: %s: want %s, got %s", e.Var, e.Accepts, e.Got)
}

// IsError reports whether err is (or wraps) a configuration error.
func IsError(err error) bool {
	var e *Error
	return errors.As(err, &e)
}

// MinHealthTokenLen is the shortest HEALTH_TOKEN production accepts.
const MinHealthTokenLen = 16

// Getenv is os.Getenv's shape, injected so tests need no process environment.
type Getenv func(string) string

// Load parses every variable. The first bad value is returned as *Error.
func Load(getenv Getenv) (*Config, error) {
	p := parser{getenv: getenv}
	c := &Config{}

	c.SessionID = p.str("SESSION_ID")
	if strings.TrimSpace(c.SessionID) == "" {
		p.fail("SESSION_ID", "a non-empty name", c.SessionID)
	}
	c.BotName = p.str("BOT_NAME")
	c.OwnerNumber = p.phone("OWNER_NUMBER")
	c.Prefix = p.str("PREFIX")
	if c.Prefix == "" || strings.ContainsFunc(c.Prefix, unicode.IsSpace) {
		p.fail("PREFIX", "one or more non-space characters", c.Prefix)
	}
	c.Port = p.intRange("PORT", 0, 65535) // 0 picks a free port (tests)
	c.DataDir = p.str("DATA_DIR")
	if c.DataDir == "" {
		p.fail("DATA_DIR", "a directory path", "")
	}

	c.DatabaseURL = p.str("DATABASE_URL")
	if c.DatabaseURL != "" {
		if u, err := url.Parse(c.DatabaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			p.fail("DATABASE_URL", "a postgres:// or postgresql:// URL (or nothing, for the embedded SQLite)", c.DatabaseURL)
		}
	}
	c.DatabaseMaxConns = p.intRange("DATABASE_MAX_CONNS", 1, 1000)
	c.NATSURL = p.str("NATS_URL")
	if c.NATSURL != "" {
		if msg := checkNATSURL(c.NATSURL); msg != "" {
			p.fail("NATS_URL", "nats://[user:password@]host[:port], or several separated by commas ("+msg+"; a password holding / # ? @ must be percent-encoded)", c.NATSURL)
		}
	}
	c.NATSListen = p.str("NATS_LISTEN")
	c.NATSListenSet = strings.TrimSpace(getenv("NATS_LISTEN")) != ""
	c.NATSToken = p.str("NATS_TOKEN")
	c.NATSInternalSecret = p.str("NATS_INTERNAL_SECRET")
	switch {
	case c.NATSInternalSecret == "":
	case len(c.NATSInternalSecret) < 16:
		p.fail("NATS_INTERNAL_SECRET", "at least 16 characters (generate with: openssl rand -hex 32)", c.NATSInternalSecret)
	case c.NATSInternalSecret == c.NATSToken:
		p.fail("NATS_INTERNAL_SECRET", "a secret other than NATS_TOKEN (bots hold NATS_TOKEN)", c.NATSInternalSecret)
	}

	envVar := "BLACKSKY_ENV"
	c.Env = strings.ToLower(p.str(envVar))
	if c.Env == "" {
		envVar = "NODE_ENV"
		c.Env = strings.ToLower(p.str(envVar))
	}
	switch c.Env {
	case EnvDevelopment, EnvProduction, EnvTest:
	default:
		// "prod" must not quietly run with development's open /pair.
		p.fail(envVar, "development, production or test", c.Env)
	}
	c.Production = c.Env == EnvProduction
	c.Heroku = p.boolean("HEROKU") || getenv("DYNO") != ""

	c.HerokuAppURL = p.str("HEROKU_APP_URL")
	if c.HerokuAppURL != "" {
		u, err := url.Parse(c.HerokuAppURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			p.fail("HEROKU_APP_URL", "an http(s) URL such as https://my-bot.herokuapp.com", c.HerokuAppURL)
		}
	}
	c.KeepAwakeInterval = p.duration("KEEPAWAKE_INTERVAL", time.Minute)
	c.EnableHealthCheck = p.boolean("ENABLE_HEALTH_CHECK")
	c.EnableSessionBackup = p.boolean("ENABLE_SESSION_BACKUP")
	c.BackupInterval = p.minutesOrDuration("BACKUP_INTERVAL")
	c.BackupRetention, c.BackupRetentionAge = p.retention("BACKUP_RETENTION")
	c.SyncInterval = p.optionalDuration("SYNC_INTERVAL", 100*time.Millisecond)
	c.SessionEncryptionKey = p.key("SESSION_ENCRYPTION_KEY")
	c.AllowPlaintextBackups = p.boolean("ALLOW_PLAINTEXT_BACKUPS")
	c.EnableMemoryOptimization = p.boolean("ENABLE_MEMORY_OPTIMIZATION")
	c.HealthToken = p.str("HEALTH_TOKEN")
	if c.Production && c.HealthToken != "" && len(c.HealthToken) < MinHealthTokenLen {
		// A short token falls to guessing, even at one wrong try a second.
		p.fail("HEALTH_TOKEN", fmt.Sprintf("at least %d characters in production (openssl rand -hex 32)", MinHealthTokenLen), c.HealthToken)
	}
	c.PairPhone = p.phone("PAIR_PHONE")
	c.WhatsAppSandbox = p.boolean("WHATSAPP_SANDBOX")
	c.SandboxSeed = p.str("SANDBOX_SEED")
	if c.WhatsAppSandbox && c.Production {
		p.fail("WHATSAPP_SANDBOX", "false in production (NODE_ENV or BLACKSKY_ENV is production): the sandbox is not WhatsApp", p.str("WHATSAPP_SANDBOX"))
	}
	if len(c.SandboxSeed) > 256 && p.err == nil {
		// The seed derives the sandbox device's keys: not shown.
		p.err = &Error{Var: "SANDBOX_SEED", Accepts: "at most 256 characters", Got: fmt.Sprintf("a value of %d characters (not shown)", len(c.SandboxSeed))}
	}

	c.ReconnectMin = p.duration("RECONNECT_MIN", time.Millisecond)
	c.ReconnectMax = p.duration("RECONNECT_MAX", time.Millisecond)
	if p.err == nil && c.ReconnectMax < c.ReconnectMin {
		p.fail("RECONNECT_MAX", "a duration not below RECONNECT_MIN ("+c.ReconnectMin.String()+")", c.ReconnectMax.String())
	}
	c.SendRate = p.rate("SEND_RATE")
	c.ShutdownTimeout = p.duration("SHUTDOWN_TIMEOUT", time.Second)

	c.MessageRetention = p.days("MESSAGE_RETENTION", time.Minute)
	c.NATSJetStream = p.boolean("NATS_JETSTREAM")
	c.WebhookURL = p.str("WEBHOOK_URL")
	if c.WebhookURL != "" {
		if u, err := url.Parse(c.WebhookURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			p.fail("WEBHOOK_URL", "an http(s) URL", c.WebhookURL)
		}
	}
	c.WebhookSecret = p.str("WEBHOOK_SECRET")
	for _, e := range strings.Split(p.str("WEBHOOK_EVENTS"), ",") {
		if e = strings.TrimSpace(e); e != "" {
			c.WebhookEvents = append(c.WebhookEvents, e)
		}
	}
	if !validEvents(c.WebhookEvents) {
		p.fail("WEBHOOK_EVENTS", "a comma-separated list of msg.in, msg.receipt, msg.sent, msg.send_failed, conn.* or conn.<kind>", p.str("WEBHOOK_EVENTS"))
	}
	c.WebhookRetryFor = p.days("WEBHOOK_RETRY_FOR", time.Second)

	c.LogLevel = p.level("LOG_LEVEL")
	c.LogFormat = p.str("LOG_FORMAT")
	switch c.LogFormat {
	case "":
		c.LogFormat = "text"
		if c.Production {
			c.LogFormat = "json"
		}
	case "text", "json":
	default:
		p.fail("LOG_FORMAT", "text or json", c.LogFormat)
	}

	if p.err == nil && c.NATSListenSet {
		if err := ValidateListen(c.NATSListen, c.NATSToken); err != nil {
			return nil, err
		}
	}
	if p.err != nil {
		return nil, p.err
	}
	return c, nil
}

// webhookEvents are the events relay can post; conn.* and conn.<kind>
// (any kind name) are accepted too, relay checks the kind.
var webhookEvents = []string{"msg.in", "msg.receipt", "msg.sent", "msg.send_failed"}

func validEvents(events []string) bool {
	if len(events) == 0 {
		return false
	}
	for _, e := range events {
		k, conn := strings.CutPrefix(e, "conn.")
		if !slices.Contains(webhookEvents, e) && !(conn && k != "" && !strings.ContainsAny(k, ". >")) {
			return false
		}
	}
	return true
}

// ValidateListen checks a NATS_LISTEN address and that a token guards it when
// it is reachable from other hosts.
func ValidateListen(listen, token string) error {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return &Error{Var: "NATS_LISTEN", Accepts: "host:port such as 127.0.0.1:4222 or 0.0.0.0:4222", Got: strconv.Quote(listen)}
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return &Error{Var: "NATS_LISTEN", Accepts: "a port from 0 to 65535", Got: strconv.Quote(listen)}
	}
	if token == "" && !IsLoopback(host) {
		return &Error{Var: "NATS_TOKEN", Accepts: "a token when NATS_LISTEN (" + listen + ") is not a loopback address", Got: "nothing"}
	}
	return nil
}

// IsLoopback reports whether host only accepts local connections.
func IsLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// PostgresURL is DATABASE_URL ready for pgx: Heroku's postgres:// URLs name
// no sslmode but its servers refuse plaintext, so on Heroku sslmode defaults
// to require; an explicit sslmode is kept. Empty when DATABASE_URL is.
func (c *Config) PostgresURL() string {
	if c.DatabaseURL == "" || !c.Heroku {
		return c.DatabaseURL
	}
	u, err := url.Parse(c.DatabaseURL)
	if err != nil || u.Query().Has("sslmode") {
		return c.DatabaseURL
	}
	q := u.Query()
	q.Set("sslmode", "require")
	u.RawQuery = q.Encode()
	return u.String()
}

// RequireDatabase is the Heroku rule: there the disk is wiped daily, so the
// embedded SQLite cannot keep a session and an empty DATABASE_URL is an error.
func (c *Config) RequireDatabase() error {
	if c.Heroku && c.DatabaseURL == "" && c.EnableSessionBackup {
		return &Error{Var: "DATABASE_URL", Accepts: "a PostgreSQL URL on Heroku (add the heroku-postgresql add-on: heroku addons:create heroku-postgresql)", Got: "nothing"}
	}
	return nil
}
