package backup

import (
	"time"

	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/shared/jobs"
)

// Defaults of Config; the first three match shared/config's defaults of
// BACKUP_INTERVAL, BACKUP_RETENTION and SHUTDOWN_TIMEOUT.
const (
	DefaultInterval        = 30 * time.Minute
	DefaultRetention       = 48
	DefaultShutdownTimeout = 25 * time.Second
	DefaultDBWait          = 20 * time.Second
	DefaultReplyTimeout    = 2 * time.Minute
)

// Config is what the backup service uses of the product's configuration,
// and nothing else; cmd/blacksky maps shared/config into it. A zero field
// takes its default.
type Config struct {
	SessionID string // required
	DataDir   string // holds session.db and the local fallback (backups/); required

	// EncryptionKey encrypts snapshots (AES-256-GCM); empty: plaintext,
	// refused in Production unless AllowPlaintext.
	EncryptionKey  []byte
	AllowPlaintext bool // accept plaintext snapshots (stored, and restored although a key is set)
	Production     bool
	Heroku         bool // the disk is wiped at every stop: a local-only shutdown snapshot is lost

	Interval  time.Duration // scheduled snapshots; negative: none
	Retention int           // points (with the chains they need) and snapshots kept per session in the database
	// RetentionAge, when positive, keeps what is younger instead of a
	// count (BACKUP_RETENTION=7d): points of that age with their chains,
	// snapshots of that age, and always the newest of each.
	RetentionAge    time.Duration
	ShutdownTimeout time.Duration // the whole process's stop budget (backup uses 70% of it)

	// DatabaseKind names the database for the heartbeat while none is
	// open: "postgres" or "sqlite" (zero: sqlite).
	DatabaseKind string

	LeaseTTL     time.Duration // see DefaultLeaseTTL
	StandbyRetry time.Duration // how often a standby reads the lease row; see DefaultStandbyRetry
	DBWait       time.Duration // how long start waits for the database before going degraded
	ReplyTimeout time.Duration // how long a request waits for its snapshot
	// QueuePollInterval overrides River's poll interval (tests).
	QueuePollInterval time.Duration

	// SyncInterval is SYNC_INTERVAL: continuous incremental replication
	// ships committed changes at most this often. Unlike the other fields,
	// zero (or negative) is not a default but off: the full-snapshot
	// pipeline of before (cmd maps SYNC_INTERVAL's own default, 1s).
	SyncInterval time.Duration
	// Policy decides when a new base is due (compaction); zero fields take
	// incr's defaults.
	Policy incr.Policy
	// Maintenance spaces the compaction and retention jobs while SyncInterval
	// is on; zero: jobs.BackupMaintenance.
	Maintenance time.Duration
	// WatchPoll is how often the store's data_version is polled; zero:
	// incr's default (50ms).
	WatchPoll time.Duration
}

// Schedule is backup's periodic jobs (see package jobs): cmd gives every
// River client of the process (relay's too) this same schedule, since the
// leader, whichever client it is, enqueues them.
func (c Config) Schedule() jobs.Schedule {
	c = c.withDefaults()
	s := jobs.Schedule{BackupInterval: max(c.Interval, 0), Retention: c.Maintenance}
	if c.SyncInterval > 0 {
		s.Compaction = c.Maintenance
	}
	return s
}

// withDefaults fills the zero fields.
func (c Config) withDefaults() Config {
	set := func(d *time.Duration, def time.Duration) {
		if *d == 0 {
			*d = def
		}
	}
	set(&c.Interval, DefaultInterval)
	set(&c.ShutdownTimeout, DefaultShutdownTimeout)
	set(&c.LeaseTTL, DefaultLeaseTTL)
	set(&c.StandbyRetry, DefaultStandbyRetry)
	set(&c.DBWait, DefaultDBWait)
	set(&c.ReplyTimeout, DefaultReplyTimeout)
	set(&c.Maintenance, jobs.BackupMaintenance)
	if c.Retention == 0 {
		c.Retention = DefaultRetention
	}
	if c.DatabaseKind == "" {
		c.DatabaseKind = "sqlite"
	}
	return c
}
