package config

// Var describes one environment variable of CONTRACT section 2. The table is
// the single source of truth: parsing reads defaults from it, and the deploy
// files (.env.example, app.json, docker-compose.yml, README) are checked
// against it so they cannot drift.
type Var struct {
	Name        string
	Default     string
	Description string
	// Secret values are never printed: not in errors, logs or /status.
	Secret bool
	// Generate names how a deploy should create the value (app.json "secret").
	Generate string
}

// Vars lists every variable BLACKSKY-MD reads, in the order the contract gives.
var Vars = []Var{
	{Name: "SESSION_ID", Default: "BLACKSKY-MD", Description: "Names the WhatsApp session: in NATS subjects, snapshot rows and the lease."},
	{Name: "BOT_NAME", Default: "BLACKSKY-MD", Description: "The name WhatsApp shows under linked devices."},
	{Name: "OWNER_NUMBER", Default: "", Description: "Owner's phone number, digits only (a leading + and spaces are stripped): owner commands and alerts."},
	{Name: "PREFIX", Default: ".", Description: "Owner command prefix."},
	{Name: "PORT", Default: "8080", Description: "HTTP port of the health service (Heroku sets it)."},
	{Name: "DATA_DIR", Default: "./data", Description: "Local state: session.db, blacksky.db (when DATABASE_URL is empty) and backups/."},
	{Name: "DATABASE_URL", Default: "", Description: "PostgreSQL for jobs, snapshots and the lease. Empty: embedded SQLite in DATA_DIR. Required on Heroku.", Secret: true},
	{Name: "DATABASE_MAX_CONNS", Default: "5", Description: "Database pool size (Heroku's smallest plans allow 20 connections in all)."},
	{Name: "NATS_URL", Default: "", Description: "External NATS server; empty means the embedded one.", Secret: true},
	{Name: "NATS_LISTEN", Default: "127.0.0.1:4222", Description: "Where the embedded NATS server listens for other processes; when the default is taken, a free loopback port is used (written to DATA_DIR/bus.json). backup, health and the client commands use it only when it is set; a set one that is taken exits 2."},
	{Name: "NATS_TOKEN", Default: "", Description: "The bots' credential on the bus (events, msg.send, backup.request); generated at start when empty. Required when NATS_LISTEN is not loopback.", Secret: true, Generate: "secret"},
	{Name: "NATS_INTERNAL_SECRET", Default: "", Description: "Password of BLACKSKY-MD's own services on the bus (at least 16 characters, not NATS_TOKEN); generated at start when empty. Required by the backup and health roles.", Secret: true, Generate: "secret"},
	{Name: "NODE_ENV", Default: "development", Description: "development, production or test; anything else stops the start. production: JSON logs, the HEALTH_TOKEN pages answer 403 while it is unset, snapshots need SESSION_ENCRYPTION_KEY (CONTRACT.md, What production changes)."},
	{Name: "BLACKSKY_ENV", Default: "", Description: "Same as NODE_ENV; wins when both are set."},
	{Name: "HEROKU", Default: "false", Description: "Heroku mode (also on when DYNO is set)."},
	{Name: "HEROKU_APP_URL", Default: "", Description: "Public URL of the app; /healthz on it is fetched every KEEPAWAKE_INTERVAL so an eco dyno does not sleep."},
	{Name: "KEEPAWAKE_INTERVAL", Default: "25m", Description: "Period of the keep-awake ping."},
	{Name: "ENABLE_HEALTH_CHECK", Default: "true", Description: "Heartbeat-based readiness and the keep-awake ping (/healthz is always served)."},
	{Name: "ENABLE_SESSION_BACKUP", Default: "true", Description: "Scheduled, shutdown and on-demand snapshots, and restore on start."},
	{Name: "BACKUP_INTERVAL", Default: "30", Description: "Period of scheduled snapshots: minutes, or a Go duration such as 90s or 1h."},
	{Name: "BACKUP_RETENTION", Default: "48", Description: "What the database keeps per session: a count of points and of snapshots (48), or an age such as 7d or 36h; a kept point keeps the base and deltas it needs, and the newest is always kept. With SYNC_INTERVAL on, a point is taken each interval the store changes, so 48 points are about a minute of a busy bot's history (a quiet bot's points span hours); whatever it says, the points never occupy more than 3 times the store: the oldest whole chains go first (the local fallback keeps the newest 3 snapshots, or one chain of points)."},
	{Name: "SYNC_INTERVAL", Default: "1s", Description: "Continuous incremental replication: committed session changes reach the database within this interval (a delta of the changed pages). 0 turns it off: scheduled, manual, paired and shutdown snapshots only, as before."},
	{Name: "SESSION_ENCRYPTION_KEY", Default: "", Description: "Key for snapshots at rest: 64 hex or 44 base64 characters (32 bytes).", Secret: true, Generate: "secret"},
	{Name: "ALLOW_PLAINTEXT_BACKUPS", Default: "false", Description: "In production, allow snapshots without SESSION_ENCRYPTION_KEY."},
	{Name: "ENABLE_MEMORY_OPTIMIZATION", Default: "true", Description: "Set Go's soft memory limit to 90% of the container's memory limit when GOMEMLIMIT is unset."},
	{Name: "HEALTH_TOKEN", Default: "", Description: "Opens /pair, /riverui/ and the detailed /status (Bearer header or sign-in form). Unset: open to anyone in development, 403 in production.", Secret: true, Generate: "secret"},
	{Name: "PAIR_PHONE", Default: "", Description: "Link by pairing code on this phone number instead of by QR."},
	{Name: "WHATSAPP_SANDBOX", Default: "false", Description: "Run against the built-in WhatsApp sandbox instead of WhatsApp, for building bots offline and for tests (docs/sandbox.md). Refused in production."},
	{Name: "SANDBOX_SEED", Default: "", Description: "Seed of the sandbox's ids, keys and timing, so runs repeat. Empty: the seed stored in DATA_DIR/sandbox.db, or a new one."},
	{Name: "RECONNECT_MIN", Default: "1s", Description: "Lower bound of the WhatsApp reconnect backoff."},
	{Name: "RECONNECT_MAX", Default: "5m", Description: "Upper bound of the WhatsApp reconnect backoff."},
	{Name: "SEND_RATE", Default: "20/m", Description: "Outbound message rate limit: N/s, N/m or N/h. relay paces its send queue with it."},
	{Name: "MESSAGE_RETENTION", Default: "7d", Description: "How long relay keeps incoming messages, receipts and finished sends (P.msg.replay, the JetStream stream): a duration such as 72h, or days such as 7d."},
	{Name: "NATS_JETSTREAM", Default: "false", Description: "Run JetStream in the embedded NATS server, storing in DATA_DIR/jetstream: relay then keeps each session's messages in a stream bots read with durable consumers (docs/relay.md)."},
	{Name: "WEBHOOK_URL", Default: "", Description: "relay POSTs events here (JSON, signed with WEBHOOK_SECRET); empty: no webhook. Logs show it without its userinfo and query.", Secret: true},
	{Name: "WEBHOOK_SECRET", Default: "", Description: "Key of the webhook's X-Blacksky-Signature (HMAC-SHA256 over timestamp and body; docs/relay.md).", Secret: true, Generate: "secret"},
	{Name: "WEBHOOK_EVENTS", Default: "msg.in,conn.*", Description: "Events posted to the webhook, comma-separated: msg.in, msg.receipt, msg.sent, msg.send_failed, conn.* or conn.<kind>."},
	{Name: "WEBHOOK_RETRY_FOR", Default: "24h", Description: "How long a webhook delivery answered 408, 429, 5xx or not at all is retried before it is dead (blacksky deliveries retry sends dead ones again); cut to MESSAGE_RETENTION when longer."},
	{Name: "SHUTDOWN_TIMEOUT", Default: "25s", Description: "Everything stops within this after SIGTERM (Heroku kills at 30s)."},
	{Name: "LOG_LEVEL", Default: "info", Description: "debug, info, warn or error."},
	{Name: "LOG_FORMAT", Default: "", Description: "text or json (default: text, json in production)."},
}

// Lookup returns the Var named name.
func Lookup(name string) (Var, bool) {
	for _, v := range Vars {
		if v.Name == name {
			return v, true
		}
	}
	return Var{}, false
}
