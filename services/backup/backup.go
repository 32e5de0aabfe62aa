// Package backup keeps the WhatsApp session safe: River snapshot jobs into
// PostgreSQL or SQLite, restore before the gateway opens its store, and one
// lease per session so two instances never share it.
//
// # Structure
//
// Service (service.go) runs the lease epochs and wires the parts, which each
// take the session as a parameter (no package-level state):
//   - LeaseKeeper (leasekeeper.go, leaseterm.go) holds the lease by the rule
//     below: Acquire waits as standby until it is a gain, Start/Stop own the
//     renewal goroutine, Term's channel closes at a loss, and a
//     LeaseObserver (the Service) hears the database's health and the
//     standby's watch. LeaseWatch (watch.go) is the watching half.
//   - Pipeline (pipeline.go) turns the store into stored points: the
//     Service asks it for a point covering now (Want, then Point in a River
//     job or directly) and gets back what was stored and where (Outcome).
//     Snapshots (fullpipeline.go) is the full-snapshot pipeline; coalescing
//     (coalesce.go) decides which point covers which request.
//   - Incremental (incrpipeline.go) is the continuous-replication Pipeline
//     (SYNC_INTERVAL > 0; package incr is its engine): a data_version
//     watcher (incrwatch.go) turns commits into at most one River sync job
//     per SYNC_INTERVAL (incrservice.go); each job stores a delta on the last
//     recorded point, or a base, with its new pieces in the job's own
//     transaction. LocalPoints (incrlocal.go) keeps points while the
//     database fails; retention.go applies BACKUP_RETENTION to whole chains.
//   - Store is four small interfaces (Catalog, Points, Leases, Lifecycle)
//     with a typed transaction (Tx, DriverTx) in which River's job completes.
//   - Config is what backup uses of the configuration; cmd/blacksky maps
//     shared/config into it.
//
// # Continuous replication: the choices
//
// Generations fence points: the lease row's generation counts up in the very
// statement that gives the row to a new holder (and a row created after a
// release starts above every point's generation), every point records the
// generation it was captured under, and its insert requires the lease to be
// the writer's, unexpired and still of that generation, in the insert's own
// transaction. Restore tries points by generation, then sequence (incr.Newest):
// a new holder's points always supersede an older holder's.
//
// Each process starts its own chain with a fresh base at its first point
// rather than Resume on the chain it restored: a base costs one full read,
// and content-addressed 64-page pieces make the regions that did not change
// since the last base free, while a resumed chain would build on pieces this
// process never saw stored. A point going to another store than its chain's
// (the local fallback when the database fails, the database when it answers
// again) starts with a base there too, so every store holds whole chains; the
// catch-up after an outage is that base, after which the fallback is emptied
// (the points taken during the outage are not copied one by one). Sequence
// numbers continue those already stored under the same generation (a restart
// under the same holder name keeps its generation).
//
// A point is taken only when the live store has a linked device (checked as
// the capturer opens); an unlinked point slipping in through a logout racing
// a capture cannot shadow a linked one, since restore checks the device of
// the assembled store and falls back. Retention runs in the pipeline's turn
// (same River queue, one worker, and the pipeline's own lock), keeps whole
// chains, and by count also runs right after compaction once the old chain is
// no longer needed.
//
// # The lease rule
//
// One row per session in blacksky_leases names its holder; every take and
// renewal counts its version up. The holder renews every TTL/3 (TTL is
// DefaultLeaseTTL, 10 s) and releases the row at a clean stop, once its
// shutdown snapshot is in the database (or when its gateway never opened the
// store: a refused or unfinished restore).
//
// A standby reads the row every 500 ms, and at once when PostgreSQL notifies a
// release. It takes the lease when the row is gone, or when it has itself
// watched the very same row (holder, version, renewal time) for a whole TTL
// (its own, or the longer one the holder advertises in the row: expires_at
// minus renewed_at, two times of the holder's one clock, so 60 s for an older
// release and 10 minutes for a restore CLI) with every one of its reads
// answered, none more than 4*StandbyRetry+2 s after the one before and none
// taking longer than that itself (a stalled standby or a slow read saw
// nothing). LeaseWatch is the one copy of this rule, shared with `blacksky
// restore --force`. The take is a compare-and-swap on that row, so a renewal
// that lands first wins. Expiry times are never compared across machines. A
// database outage seen by the standby starts its watch over: after an outage
// for everyone, the live holder renews within TTL/3 of the database's return,
// long before any standby has watched for a TTL, so the live holder keeps the
// session and ships what it stored locally meanwhile; it is never replaced by
// a standby that would restore an older store. A dead holder is replaced about
// one TTL after its last renewal.
//
// A process that got the lease only after another holder had it (it waited as
// standby, or took a stale row) restores what that holder left in the
// database, even over a valid store on its own disk (a reused volume): that
// store is older, unless it is the newest database snapshot's very store.
//
// The holder's half: while it cannot renew it keeps its socket (guarantee 4:
// the bot stays online without its database), unless a standby backup of
// another instance reports on a shared bus (its heartbeat's lease_holder and
// lease_watch_ms, beaten at once when the watch reaches half a TTL) that it
// has seen the holder's row unchanged for half a TTL, counting answered reads
// only. Then that standby takes the lease at a whole TTL, and the holder
// fences itself first: its gateway closes the socket (conn.standby for its own
// instance) and database snapshots stop. A holder cut off alone with no shared
// bus cannot hear it: the standby takes over after its watch, and WhatsApp
// ends the older stream with stream_replaced; that event from its own gateway
// while its renewals fail fences the holder the same way, so the two do not
// trade the stream. This is the rule's one stale restore (CONTRACT guarantee
// 2): the writes a holder cut off alone made since its last snapshot in the
// database are lost, bus or not, since its snapshots were refused all along
// (inserts check the lease) and the new holder restores that older one. The holder takes up again, without a restore, if its own row is still
// its own when the database answers; otherwise it restores what the new holder
// stored, like any standby. Snapshot inserts check the lease in their own
// transaction, so a holder that lost the lease never stores one.
package backup

import (
	"context"
	"errors"
	"time"
)

// Snapshot is one stored snapshot's metadata (the payload is fetched apart:
// it can be large).
type Snapshot struct {
	ID          int64
	SessionID   string
	CreatedAt   time.Time
	Reason      string
	SHA256      string // of the plain session database
	SizeBytes   int64  // plain size
	StoredBytes int64  // payload size
	Format      string
}

// NewSnapshot is a snapshot to insert.
type NewSnapshot struct {
	SessionID   string
	CreatedAt   time.Time
	Reason      string
	SHA256      string
	SizeBytes   int64
	StoredBytes int64
	Format      string
	Payload     []byte
	// LeaseHolder, when set, makes the insert conditional: the lease row of
	// SessionID must be LeaseHolder's and unexpired at LeaseNow, checked in
	// the same transaction; otherwise nothing is stored and the error is
	// ErrLeaseLost.
	LeaseHolder string
	LeaseNow    time.Time
}

// ErrLeaseLost is a snapshot refused because this instance no longer holds
// the session lease.
var ErrLeaseLost = errors.New("not stored: this instance no longer holds the session lease")

// Lease says who holds a session and until when. Version counts every take
// and renewal; with Holder and RenewedAt it identifies one state of the row.
type Lease struct {
	SessionID  string
	Holder     string
	AcquiredAt time.Time
	RenewedAt  time.Time
	ExpiresAt  time.Time
	Version    int64
	// Generation numbers the row's holders: it counts up whenever the row
	// goes to a new holder (a take, never a renewal), and a fresh row starts
	// above every generation of the session's points. Points record it and
	// their insert requires it (fencing).
	Generation int64
}

// Same reports whether l and o are the same state of a lease row: nobody
// took or renewed it in between.
func (l Lease) Same(o Lease) bool {
	return l.Holder == o.Holder && l.Version == o.Version && l.RenewedAt.Equal(o.RenewedAt)
}

// ErrNotFound is returned for a snapshot id that does not exist.
var ErrNotFound = errors.New("snapshot not found")

// Store is one database of snapshots and leases: the three small interfaces
// below together (Points in points.go). Implementations: postgres and sqlite, both checked by the
// storetest suite. Consumers take the smallest one they need (Restorer a
// Catalog, LeaseKeeper Leases).
type Store interface {
	Catalog
	Points
	Leases
	Lifecycle
}

// Catalog keeps the stored snapshots of sessions.
type Catalog interface {
	// InsertSnapshot inserts s and runs inTx (when not nil) in the same
	// transaction; nothing is stored unless both succeed.
	InsertSnapshot(ctx context.Context, s NewSnapshot, inTx InTx) (int64, error)
	// List returns up to limit snapshots of session, newest first.
	List(ctx context.Context, session string, limit int) ([]Snapshot, error)
	// Payload returns a snapshot's stored bytes, or ErrNotFound.
	Payload(ctx context.Context, id int64) ([]byte, error)
	// Prune deletes all but the newest keep snapshots of session.
	Prune(ctx context.Context, session string, keep int) (int64, error)
}

// Leases keeps one lease row per session (see the package's lease rule).
type Leases interface {
	// AcquireLease takes or renews the lease for holder until now+ttl when it
	// is free or already holder's, or, when stale is not the zero Lease, when
	// the row is still exactly stale (Lease.Same): the caller watched it stay
	// so for a whole TTL (see the package's lease rule). An expiry alone
	// frees nothing. It always returns the lease as it stands after the
	// attempt (Holder empty: none), and whether holder has it.
	AcquireLease(ctx context.Context, session, holder string, now time.Time, ttl time.Duration, stale Lease) (Lease, bool, error)
	// ReleaseLease frees the lease if holder has it.
	ReleaseLease(ctx context.Context, session, holder string) error
}

// Lifecycle is the database itself: its schema, its River queue, its
// connection.
type Lifecycle interface {
	// Kind is "postgres" or "sqlite".
	Kind() string
	// Migrate creates or upgrades our tables and River's; idempotent. On
	// PostgreSQL two processes may run it at once; on SQLite only one at a
	// time (River's SQLite migrations race on "river_migration").
	Migrate(ctx context.Context) error
	// NewQueue builds the River client on this database.
	NewQueue(cfg QueueConfig) (Queue, error)
	// Ping checks the database answers.
	Ping(ctx context.Context) error
	Close()
}

// LeaseWatcher is a Store that hears of a released lease at once
// (PostgreSQL LISTEN/NOTIFY), so a standby takes over without waiting for
// its next poll.
type LeaseWatcher interface {
	// WatchLeases calls released each time a lease of session is released,
	// until ctx ends or the connection fails (the error says which).
	WatchLeases(ctx context.Context, session string, released func()) error
}

// Latest returns the newest snapshot of session, or nil when none: the head
// of List, so every store answers it the same way.
func Latest(ctx context.Context, st Catalog, session string) (*Snapshot, error) {
	list, err := st.List(ctx, session, 1)
	if err != nil || len(list) == 0 {
		return nil, err
	}
	return &list[0], nil
}
