// Package sqltext holds the SQL of the snapshot and lease stores. The
// queries are written once for both PostgreSQL and SQLite (both accept $N
// parameters, ON CONFLICT and RETURNING); only the table definitions differ.
package sqltext

// Migration is one numbered schema step.
type Migration struct {
	Version int
	Name    string
	SQL     []string
}

// CreateMigrations creates the version table; idempotent.
const CreateMigrations = `CREATE TABLE IF NOT EXISTS blacksky_migrations (
	version INTEGER PRIMARY KEY,
	name TEXT NOT NULL,
	applied_at_ms BIGINT NOT NULL
)`

// AppliedVersions lists applied migrations.
const AppliedVersions = `SELECT version FROM blacksky_migrations`

// RecordMigration marks a migration applied.
const RecordMigration = `INSERT INTO blacksky_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)
ON CONFLICT (version) DO NOTHING`

// Lease times are unix milliseconds in both databases: SQLite has no time
// type, and comparing them must be exact.

// PostgresMigrations are our tables on PostgreSQL.
var PostgresMigrations = []Migration{
	{Version: 1, Name: "snapshots and leases", SQL: []string{
		`CREATE TABLE IF NOT EXISTS blacksky_snapshots (
			id BIGSERIAL PRIMARY KEY,
			session_id TEXT NOT NULL,
			created_at TIMESTAMPTZ NOT NULL,
			reason TEXT NOT NULL,
			sha256 TEXT NOT NULL,
			size_bytes BIGINT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			format TEXT NOT NULL,
			payload BYTEA NOT NULL
		)`,
		// The payload is already compressed: spare PostgreSQL a second try.
		`ALTER TABLE blacksky_snapshots ALTER COLUMN payload SET STORAGE EXTERNAL`,
		`CREATE INDEX IF NOT EXISTS blacksky_snapshots_session_idx ON blacksky_snapshots (session_id, id)`,
		`CREATE TABLE IF NOT EXISTS blacksky_leases (
			session_id TEXT PRIMARY KEY,
			holder TEXT NOT NULL,
			acquired_at_ms BIGINT NOT NULL,
			renewed_at_ms BIGINT NOT NULL,
			expires_at_ms BIGINT NOT NULL
		)`,
	}},
	{Version: 2, Name: "lease version", SQL: []string{leaseVersion}},
}

// leaseVersion counts every take and renewal of a lease: a standby tells a
// live holder from a dead one by watching it change (see AcquireLease).
// Rows written before it start at 1.
const leaseVersion = `ALTER TABLE blacksky_leases ADD COLUMN version BIGINT NOT NULL DEFAULT 1`

// SQLiteMigrations are our tables on SQLite.
var SQLiteMigrations = []Migration{
	{Version: 1, Name: "snapshots and leases", SQL: []string{
		`CREATE TABLE IF NOT EXISTS blacksky_snapshots (
			id INTEGER PRIMARY KEY AUTOINCREMENT,
			session_id TEXT NOT NULL,
			created_at TIMESTAMP NOT NULL,
			reason TEXT NOT NULL,
			sha256 TEXT NOT NULL,
			size_bytes BIGINT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			format TEXT NOT NULL,
			payload BLOB NOT NULL
		)`,
		`CREATE INDEX IF NOT EXISTS blacksky_snapshots_session_idx ON blacksky_snapshots (session_id, id)`,
		`CREATE TABLE IF NOT EXISTS blacksky_leases (
			session_id TEXT PRIMARY KEY,
			holder TEXT NOT NULL,
			acquired_at_ms BIGINT NOT NULL,
			renewed_at_ms BIGINT NOT NULL,
			expires_at_ms BIGINT NOT NULL
		)`,
	}},
	{Version: 2, Name: "lease version", SQL: []string{leaseVersion}},
}

const snapshotCols = `id, session_id, created_at, reason, sha256, size_bytes, stored_bytes, format`

// InsertSnapshot inserts a row and returns its id.
const InsertSnapshot = `INSERT INTO blacksky_snapshots
	(session_id, created_at, reason, sha256, size_bytes, stored_bytes, format, payload)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id`

// ListSnapshots lists a session's snapshots, newest first.
const ListSnapshots = `SELECT ` + snapshotCols + ` FROM blacksky_snapshots
	WHERE session_id = $1 ORDER BY id DESC LIMIT $2`

// SnapshotPayload reads one payload.
const SnapshotPayload = `SELECT payload FROM blacksky_snapshots WHERE id = $1`

// PruneSnapshots keeps the newest $2 snapshots of session $1.
const PruneSnapshots = `DELETE FROM blacksky_snapshots WHERE session_id = $1 AND id NOT IN
	(SELECT id FROM blacksky_snapshots WHERE session_id = $1 ORDER BY id DESC LIMIT $2)`

// AcquireLease takes or renews the lease ($3 is now, $4 the new expiry)
// when it is free or already the holder's, or when it is exactly the row a
// standby observed unchanged for a whole TTL: holder $5, version $6, renewed
// at $7 (the renewal time too, so a holder of an older release, which does
// not count versions, is still seen renewing). Expiry alone never frees a
// lease. Every take and renewal counts the version up.
const AcquireLease = `INSERT INTO blacksky_leases (session_id, holder, acquired_at_ms, renewed_at_ms, expires_at_ms, version)
	VALUES ($1, $2, $3, $3, $4, 1)
	ON CONFLICT (session_id) DO UPDATE SET
		holder = excluded.holder,
		acquired_at_ms = CASE WHEN blacksky_leases.holder = excluded.holder
			THEN blacksky_leases.acquired_at_ms ELSE excluded.acquired_at_ms END,
		renewed_at_ms = excluded.renewed_at_ms,
		expires_at_ms = excluded.expires_at_ms,
		version = blacksky_leases.version + 1
	WHERE blacksky_leases.holder = excluded.holder
		OR (blacksky_leases.holder = $5 AND blacksky_leases.version = $6 AND blacksky_leases.renewed_at_ms = $7)`

// HoldLease is the lease condition of a snapshot insert: it matches (and,
// in PostgreSQL, locks until commit, so a takeover waits for it) the lease
// row only while $2 holds it unexpired at $3. No row: do not insert.
const HoldLease = `UPDATE blacksky_leases SET renewed_at_ms = renewed_at_ms
	WHERE session_id = $1 AND holder = $2 AND expires_at_ms > $3`

// GetLease reads the lease as it stands.
const GetLease = `SELECT holder, acquired_at_ms, renewed_at_ms, expires_at_ms, version FROM blacksky_leases WHERE session_id = $1`

// LeaseChannel is the PostgreSQL NOTIFY channel of lease releases; the
// payload is the session id.
const LeaseChannel = "blacksky_lease"

// NotifyLease tells PostgreSQL listeners that session's lease changed.
const NotifyLease = `SELECT pg_notify('` + LeaseChannel + `', $1)`

// ReleaseLease frees the holder's lease.
const ReleaseLease = `DELETE FROM blacksky_leases WHERE session_id = $1 AND holder = $2`
