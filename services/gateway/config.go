package gateway

import (
	"cmp"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"golang.org/x/time/rate"
)

// Defaults for Config fields left zero.
const (
	DefaultReconnectMin       = time.Second
	DefaultReconnectMax       = 5 * time.Minute
	DefaultStableAfter        = 60 * time.Second
	DefaultStreamReplacedWait = 10 * time.Minute
	DefaultBanFallbackWait    = time.Hour
	DefaultLoginTimeout       = 90 * time.Second
	DefaultKeepaliveMaxFail   = 3 * time.Minute
	DefaultRestoreTimeout     = 30 * time.Second
	DefaultOfflineAlertAfter  = 5 * time.Minute
	DefaultBackupTimeout      = 2 * time.Minute
	DefaultSendTimeout        = 30 * time.Second
	DefaultLivenessInterval   = 30 * time.Second
	DefaultSendRate           = rate.Limit(20.0 / 60)
	DefaultPairHintEvery      = 5 * time.Minute
	DefaultRelayTimeout       = 10 * time.Second
)

// Fixed bounds.
const (
	// RestoreMaxBackoff caps the wait between P.session.restore attempts
	// after no responders, a transport error or a refusal.
	RestoreMaxBackoff = 5 * time.Second
	// VersionRefreshEvery bounds the client_outdated recovery: WhatsApp's
	// current web version is fetched (and reconnected with) at most this
	// often.
	VersionRefreshEvery = time.Hour
	// VersionFetchTimeout bounds one fetch of that version.
	VersionFetchTimeout = 30 * time.Second
	// OwnerSendWait is how far away a rate slot an owner reply or alert
	// may wait for.
	OwnerSendWait = time.Minute
	// ShutdownSendGrace bounds how long sends in flight may still take
	// once shutdown has begun (and SendTimeout, if shorter).
	ShutdownSendGrace = 5 * time.Second
)

// Config is the gateway's part of the environment. Zero durations take the
// defaults above.
type Config struct {
	Session  string // SESSION_ID
	Instance string // heartbeat instance name
	// Unit is the instance id this gateway shares with its backup: it asks
	// P.session.restore.<Unit> and acts only on a restore answer and a
	// conn.standby that carry it (another instance's backup on a shared bus
	// says nothing about our session). Empty: Instance, made subject-safe.
	Unit          string
	OwnerNumber   string // digits; empty disables owner commands and alerts
	Prefix        string // owner command prefix
	PairPhone     string // digits; pair by code instead of QR
	BackupEnabled bool   // ENABLE_SESSION_BACKUP: restore before opening the store
	// PairURL is the /pair page as a person reaches it (HEROKU_APP_URL or
	// http://localhost:$PORT, with /pair), logged while no device is linked.
	PairURL string
	// Production keeps pairing codes out of the log: only /pair shows them.
	Production bool

	ReconnectMin, ReconnectMax time.Duration
	// SendRate paces what the gateway sends on its own (owner replies and
	// alerts); relay paces the bots' sends by SEND_RATE and the gateway
	// only counts them (see onSend).
	SendRate rate.Limit // sends per second; at most N+1 in any window of one period
	// RelayTimeout bounds one P.relay.store request: no ok within it and
	// the message stays unacknowledged for WhatsApp to deliver again.
	RelayTimeout time.Duration

	StableAfter        time.Duration // connected this long resets the attempt counter
	StreamReplacedWait time.Duration
	BanFallbackWait    time.Duration // ban without a stated expiry
	LoginTimeout       time.Duration // socket open but neither login nor QR
	KeepaliveMaxFail   time.Duration
	RestoreTimeout     time.Duration // per P.session.restore request
	OfflineAlertAfter  time.Duration
	BackupTimeout      time.Duration // owner "backup" command
	SendTimeout        time.Duration
	LivenessInterval   time.Duration // how often a "connected" socket is checked
	HeartbeatInterval  time.Duration // zero: bus.HeartbeatInterval
	PairHintEvery      time.Duration // how often "not linked: open .../pair" is logged
}

func (c Config) withDefaults() Config {
	c.ReconnectMin = cmp.Or(c.ReconnectMin, DefaultReconnectMin)
	c.ReconnectMax = max(cmp.Or(c.ReconnectMax, DefaultReconnectMax), c.ReconnectMin)
	c.SendRate = cmp.Or(c.SendRate, DefaultSendRate)
	c.RelayTimeout = cmp.Or(c.RelayTimeout, DefaultRelayTimeout)
	c.StableAfter = cmp.Or(c.StableAfter, DefaultStableAfter)
	c.StreamReplacedWait = cmp.Or(c.StreamReplacedWait, DefaultStreamReplacedWait)
	c.BanFallbackWait = cmp.Or(c.BanFallbackWait, DefaultBanFallbackWait)
	c.LoginTimeout = cmp.Or(c.LoginTimeout, DefaultLoginTimeout)
	c.KeepaliveMaxFail = cmp.Or(c.KeepaliveMaxFail, DefaultKeepaliveMaxFail)
	c.RestoreTimeout = cmp.Or(c.RestoreTimeout, DefaultRestoreTimeout)
	c.OfflineAlertAfter = cmp.Or(c.OfflineAlertAfter, DefaultOfflineAlertAfter)
	c.BackupTimeout = cmp.Or(c.BackupTimeout, DefaultBackupTimeout)
	c.SendTimeout = cmp.Or(c.SendTimeout, DefaultSendTimeout)
	c.LivenessInterval = cmp.Or(c.LivenessInterval, DefaultLivenessInterval)
	c.PairHintEvery = cmp.Or(c.PairHintEvery, DefaultPairHintEvery)
	c.Prefix = cmp.Or(c.Prefix, ".")
	c.Unit = cmp.Or(c.Unit, bus.InstanceToken(c.Instance), "gateway")
	return c
}
