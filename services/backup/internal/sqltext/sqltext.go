// Package sqltext holds the SQL of the snapshot, point and lease stores. The
// queries are written once for both PostgreSQL and SQLite (both accept $N
// parameters, ON CONFLICT and RETURNING); only the table definitions differ.
package sqltext

import "github.com/blacksky-md/blacksky/internal/sqlstore"

// Migration is one numbered schema step.
type Migration = sqlstore.Migration

// MigrationsTable records which of backup's migrations ran.
const MigrationsTable = "blacksky_migrations"

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
	{Version: 3, Name: "incremental points", SQL: []string{
		leaseGeneration,
		`CREATE TABLE IF NOT EXISTS blacksky_points (
			id BIGSERIAL PRIMARY KEY,
			session_id TEXT NOT NULL,
			generation BIGINT NOT NULL,
			seq BIGINT NOT NULL,
			kind TEXT NOT NULL,
			manifest_id TEXT NOT NULL,
			parent TEXT NOT NULL,
			created_at TIMESTAMPTZ NOT NULL,
			reason TEXT NOT NULL,
			db_sha256 TEXT NOT NULL,
			size_bytes BIGINT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			manifest BYTEA NOT NULL,
			UNIQUE (session_id, manifest_id)
		)`,
		`ALTER TABLE blacksky_points ALTER COLUMN manifest SET STORAGE EXTERNAL`,
		`CREATE INDEX IF NOT EXISTS blacksky_points_session_idx ON blacksky_points (session_id, id)`,
		`CREATE TABLE IF NOT EXISTS blacksky_pieces (
			session_id TEXT NOT NULL,
			id TEXT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			payload BYTEA NOT NULL,
			PRIMARY KEY (session_id, id)
		)`,
		`ALTER TABLE blacksky_pieces ALTER COLUMN payload SET STORAGE EXTERNAL`,
		`CREATE TABLE IF NOT EXISTS blacksky_point_pieces (
			point_id BIGINT NOT NULL REFERENCES blacksky_points (id) ON DELETE CASCADE,
			session_id TEXT NOT NULL,
			piece_id TEXT NOT NULL,
			PRIMARY KEY (point_id, piece_id)
		)`,
		`CREATE INDEX IF NOT EXISTS blacksky_point_pieces_piece_idx ON blacksky_point_pieces (session_id, piece_id)`,
	}},
}

// leaseGeneration numbers the lease's holders: AcquireLease counts it up in
// the statement that gives the row to a new holder (see AcquireLease).
const leaseGeneration = `ALTER TABLE blacksky_leases ADD COLUMN generation BIGINT NOT NULL DEFAULT 1`

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
	{Version: 3, Name: "incremental points", SQL: []string{
		leaseGeneration,
		`CREATE TABLE IF NOT EXISTS blacksky_points (
			id INTEGER PRIMARY KEY AUTOINCREMENT,
			session_id TEXT NOT NULL,
			generation BIGINT NOT NULL,
			seq BIGINT NOT NULL,
			kind TEXT NOT NULL,
			manifest_id TEXT NOT NULL,
			parent TEXT NOT NULL,
			created_at TIMESTAMP NOT NULL,
			reason TEXT NOT NULL,
			db_sha256 TEXT NOT NULL,
			size_bytes BIGINT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			manifest BLOB NOT NULL,
			UNIQUE (session_id, manifest_id)
		)`,
		`CREATE INDEX IF NOT EXISTS blacksky_points_session_idx ON blacksky_points (session_id, id)`,
		`CREATE TABLE IF NOT EXISTS blacksky_pieces (
			session_id TEXT NOT NULL,
			id TEXT NOT NULL,
			stored_bytes BIGINT NOT NULL,
			payload BLOB NOT NULL,
			PRIMARY KEY (session_id, id)
		)`,
		`CREATE TABLE IF NOT EXISTS blacksky_point_pieces (
			point_id INTEGER NOT NULL REFERENCES blacksky_points (id) ON DELETE CASCADE,
			session_id TEXT NOT NULL,
			piece_id TEXT NOT NULL,
			PRIMARY KEY (point_id, piece_id)
		)`,
		`CREATE INDEX IF NOT EXISTS blacksky_point_pieces_piece_idx ON blacksky_point_pieces (session_id, piece_id)`,
	}},
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
//
// Generation: a new holder gets the next generation in the same statement.
// A released row is deleted, so a fresh row starts above every generation a
// point of the session was written under (the points table keeps them);
// renewals keep it. The generations of points therefore never go down.
const AcquireLease = `INSERT INTO blacksky_leases (session_id, holder, acquired_at_ms, renewed_at_ms, expires_at_ms, version, generation)
	VALUES ($1, $2, $3, $3, $4, 1,
		(SELECT COALESCE(MAX(generation), 0) + 1 FROM blacksky_points WHERE session_id = $1))
	ON CONFLICT (session_id) DO UPDATE SET
		holder = excluded.holder,
		generation = CASE WHEN blacksky_leases.holder = excluded.holder
			THEN blacksky_leases.generation
			WHEN blacksky_leases.generation + 1 > excluded.generation THEN blacksky_leases.generation + 1
			ELSE excluded.generation END,
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
const GetLease = `SELECT holder, acquired_at_ms, renewed_at_ms, expires_at_ms, version, generation FROM blacksky_leases WHERE session_id = $1`

// LeaseChannel is the PostgreSQL NOTIFY channel of lease releases; the
// payload is the session id.
const LeaseChannel = "blacksky_lease"

// NotifyLease tells PostgreSQL listeners that session's lease changed.
const NotifyLease = `SELECT pg_notify('` + LeaseChannel + `', $1)`

// ReleaseLease frees the holder's lease.
const ReleaseLease = `DELETE FROM blacksky_leases WHERE session_id = $1 AND holder = $2`

// HoldGeneration is the fencing condition of a point insert: as HoldLease,
// and the lease's generation must still be $4, the one the point was
// captured under. A holder that lost the lease and took it again since (a
// new generation) cannot slip in a point of its old one.
const HoldGeneration = `UPDATE blacksky_leases SET renewed_at_ms = renewed_at_ms
	WHERE session_id = $1 AND holder = $2 AND expires_at_ms > $3 AND generation = $4`

// Points: a point row holds its sealed manifest; its pieces are stored once
// per session and id; blacksky_point_pieces names every piece a point's
// manifest references (for garbage collection).

const pointCols = `id, session_id, generation, seq, kind, manifest_id, parent, created_at, reason, db_sha256, size_bytes, stored_bytes`

// InsertPoint inserts a point row and returns its id.
const InsertPoint = `INSERT INTO blacksky_points
	(session_id, generation, seq, kind, manifest_id, parent, created_at, reason, db_sha256, size_bytes, stored_bytes, manifest)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id`

// InsertPiece stores a piece unless the session holds that id already.
const InsertPiece = `INSERT INTO blacksky_pieces (session_id, id, stored_bytes, payload) VALUES ($1, $2, $3, $4)
	ON CONFLICT (session_id, id) DO NOTHING`

// InsertPointPiece records that point $1 references piece $3.
const InsertPointPiece = `INSERT INTO blacksky_point_pieces (point_id, session_id, piece_id) VALUES ($1, $2, $3)
	ON CONFLICT (point_id, piece_id) DO NOTHING`

// CountPointPieces counts the pieces point $1 references that the session
// holds: an insert compares it with the references it wrote, so no point
// is ever visible with a piece missing.
const CountPointPieces = `SELECT COUNT(*) FROM blacksky_point_pieces pp
	JOIN blacksky_pieces p ON p.session_id = pp.session_id AND p.id = pp.piece_id
	WHERE pp.point_id = $1`

// ListPoints lists a session's points, newest first.
const ListPoints = `SELECT ` + pointCols + ` FROM blacksky_points WHERE session_id = $1 ORDER BY id DESC LIMIT $2`

// PointManifests reads every sealed manifest of a session, oldest first.
const PointManifests = `SELECT id, manifest FROM blacksky_points WHERE session_id = $1 ORDER BY id`

// HasPiece tells whether the session holds a piece.
const HasPiece = `SELECT COUNT(*) FROM blacksky_pieces WHERE session_id = $1 AND id = $2`

// PiecePayload reads one piece.
const PiecePayload = `SELECT payload FROM blacksky_pieces WHERE session_id = $1 AND id = $2`

// DeletePoint deletes one point of a session (its references go with it).
const DeletePoint = `DELETE FROM blacksky_points WHERE session_id = $1 AND id = $2`

// DeletePointRefs deletes one point's references (SQLite without foreign
// keys enforced would keep them otherwise).
const DeletePointRefs = `DELETE FROM blacksky_point_pieces WHERE point_id = $1 AND session_id = $2`

// DeleteUnreferencedPieces deletes the session's pieces no point references.
const DeleteUnreferencedPieces = `DELETE FROM blacksky_pieces WHERE session_id = $1 AND NOT EXISTS
	(SELECT 1 FROM blacksky_point_pieces pp WHERE pp.session_id = $1 AND pp.piece_id = blacksky_pieces.id)`

// PointStats sums a session's points and their storage: points, bases,
// manifest bytes, pieces, piece bytes.
const PointStats = `SELECT
	(SELECT COUNT(*) FROM blacksky_points WHERE session_id = $1),
	(SELECT COUNT(*) FROM blacksky_points WHERE session_id = $1 AND kind = 'base'),
	(SELECT CAST(COALESCE(SUM(LENGTH(manifest)), 0) AS BIGINT) FROM blacksky_points WHERE session_id = $1),
	(SELECT COUNT(*) FROM blacksky_pieces WHERE session_id = $1),
	(SELECT CAST(COALESCE(SUM(stored_bytes), 0) AS BIGINT) FROM blacksky_pieces WHERE session_id = $1)`
