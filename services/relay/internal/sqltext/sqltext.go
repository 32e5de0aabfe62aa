// Package sqltext holds relay's SQL. The queries are written once for
// PostgreSQL and SQLite (both accept $N parameters, ON CONFLICT and
// RETURNING); only the table definitions differ.
package sqltext

import (
	"strings"

	"github.com/blacksky-md/blacksky/internal/sqlstore"
)

// Migration is one numbered schema step.
type Migration = sqlstore.Migration

// MigrationsTable records which of relay's migrations ran. Relay keeps its
// own version table: backup's blacksky_migrations numbers backup's steps, and
// two services numbering one table would collide.
const MigrationsTable = "blacksky_relay_migrations"

// Times are unix milliseconds in both databases: SQLite has no time type.
//
// blacksky_message_seqs holds each session's last seq. Taking the next one
// is an upsert on that row, which locks it until the transaction ends: the
// inserts of one session are serialised from that point to their commit, so
// seqs are handed out in commit order and a rolled-back insert gives its
// seq back (no gaps).
//
// blacksky_messages: one row per incoming WhatsApp message; (session_id,
// chat, wa_id) is unique, so a redelivery finds its first row and seq.
// blacksky_receipts: receipts, deduplicated by a hash of their content.
// blacksky_sends: one row per idempotency key; its outcome is written in the
// transaction that completes the send's River job.
var tables = []string{
	`CREATE TABLE IF NOT EXISTS blacksky_message_seqs (
		session_id TEXT PRIMARY KEY,
		last_seq BIGINT NOT NULL
	)`,
	`CREATE TABLE IF NOT EXISTS blacksky_messages (
		session_id TEXT NOT NULL,
		seq BIGINT NOT NULL,
		chat TEXT NOT NULL,
		wa_id TEXT NOT NULL,
		received_at_ms BIGINT NOT NULL,
		payload %BLOB% NOT NULL,
		PRIMARY KEY (session_id, seq),
		UNIQUE (session_id, chat, wa_id)
	)`,
	`CREATE INDEX IF NOT EXISTS blacksky_messages_received_idx ON blacksky_messages (session_id, received_at_ms)`,
	`CREATE TABLE IF NOT EXISTS blacksky_receipts (
		id %SERIAL% PRIMARY KEY,
		session_id TEXT NOT NULL,
		dedup TEXT NOT NULL,
		chat TEXT NOT NULL,
		received_at_ms BIGINT NOT NULL,
		payload %BLOB% NOT NULL,
		UNIQUE (session_id, dedup)
	)`,
	`CREATE INDEX IF NOT EXISTS blacksky_receipts_received_idx ON blacksky_receipts (session_id, received_at_ms)`,
	`CREATE TABLE IF NOT EXISTS blacksky_sends (
		session_id TEXT NOT NULL,
		idempotency_key TEXT NOT NULL,
		state TEXT NOT NULL,
		created_at_ms BIGINT NOT NULL,
		payload %BLOB% NOT NULL,
		wa_id TEXT NOT NULL DEFAULT '',
		sent_at_ms BIGINT NOT NULL DEFAULT 0,
		error TEXT NOT NULL DEFAULT '',
		finished_at_ms BIGINT NOT NULL DEFAULT 0,
		PRIMARY KEY (session_id, idempotency_key)
	)`,
	`CREATE INDEX IF NOT EXISTS blacksky_sends_state_idx ON blacksky_sends (session_id, state, created_at_ms)`,
}

func dialect(blob, serial string) []string {
	out := make([]string, len(tables))
	for i, q := range tables {
		out[i] = strings.NewReplacer("%BLOB%", blob, "%SERIAL%", serial).Replace(q)
	}
	return out
}

// PostgresMigrations are relay's tables on PostgreSQL.
var PostgresMigrations = []Migration{{Version: 1, Name: "messages, receipts and sends", SQL: dialect("BYTEA", "BIGSERIAL")}}

// SQLiteMigrations are relay's tables on SQLite.
var SQLiteMigrations = []Migration{{Version: 1, Name: "messages, receipts and sends", SQL: dialect("BLOB", "INTEGER")}}

// FindMessage finds a message already stored (a redelivery).
const FindMessage = `SELECT seq FROM blacksky_messages WHERE session_id = $1 AND chat = $2 AND wa_id = $3`

// NextSeq takes the session's next seq, locking its counter row until the
// transaction ends.
const NextSeq = `INSERT INTO blacksky_message_seqs (session_id, last_seq) VALUES ($1, 1)
ON CONFLICT (session_id) DO UPDATE SET last_seq = blacksky_message_seqs.last_seq + 1
RETURNING last_seq`

// InsertMessage inserts a message unless a concurrent insert of the same
// one won (then no row is returned and the caller starts over).
const InsertMessage = `INSERT INTO blacksky_messages (session_id, seq, chat, wa_id, received_at_ms, payload)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id, chat, wa_id) DO NOTHING RETURNING seq`

// PostgresInsertMessageSeq takes the session's next seq (locking its
// counter row until the transaction ends) and inserts the message with it
// in one statement: one round trip fewer while the lock that serializes
// the session's stores is held. No row: a concurrent insert of the same
// message won; the caller rolls back, which gives the seq back.
const PostgresInsertMessageSeq = `WITH s AS (` + NextSeq + `)
INSERT INTO blacksky_messages (session_id, seq, chat, wa_id, received_at_ms, payload)
SELECT $1, s.last_seq, $2, $3, $4, $5 FROM s ON CONFLICT (session_id, chat, wa_id) DO NOTHING RETURNING seq`

// GetMessage reads one message.
const GetMessage = `SELECT seq, chat, received_at_ms, payload FROM blacksky_messages WHERE session_id = $1 AND seq = $2`

// ListMessages reads messages after a seq, in seq order.
const ListMessages = `SELECT seq, chat, received_at_ms, payload FROM blacksky_messages
WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`

// InsertReceipt inserts a receipt unless the same one is stored.
const InsertReceipt = `INSERT INTO blacksky_receipts (session_id, dedup, chat, received_at_ms, payload)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id, dedup) DO NOTHING RETURNING id`

// FindReceipt finds a receipt already stored.
const FindReceipt = `SELECT id FROM blacksky_receipts WHERE session_id = $1 AND dedup = $2`

// GetReceipt reads one receipt.
const GetReceipt = `SELECT id, chat, received_at_ms, payload FROM blacksky_receipts WHERE session_id = $1 AND id = $2`

// InsertSend queues a send unless its key is known.
const InsertSend = `INSERT INTO blacksky_sends (session_id, idempotency_key, state, created_at_ms, payload)
VALUES ($1, $2, 'queued', $3, $4) ON CONFLICT (session_id, idempotency_key) DO NOTHING RETURNING created_at_ms`

// GetSend reads one send.
const GetSend = `SELECT idempotency_key, state, created_at_ms, payload, wa_id, sent_at_ms, error, finished_at_ms
FROM blacksky_sends WHERE session_id = $1 AND idempotency_key = $2`

// FinishSend records a send's outcome once: only a queued send changes.
const FinishSend = `UPDATE blacksky_sends SET state = $3, wa_id = $4, sent_at_ms = $5, error = $6, finished_at_ms = $7
WHERE session_id = $1 AND idempotency_key = $2 AND state = 'queued'`

// CountQueuedSends counts sends waiting to go out.
const CountQueuedSends = `SELECT count(*) FROM blacksky_sends WHERE session_id = $1 AND state = 'queued'`

// QueuedSendKeys lists the keys of sends waiting to go out, oldest first.
const QueuedSendKeys = `SELECT idempotency_key FROM blacksky_sends WHERE session_id = $1 AND state = 'queued'
ORDER BY created_at_ms, idempotency_key`

// Pruning: messages and receipts older than the retention; sends finished
// before it (a queued send is never dropped).
const (
	PruneMessages = `DELETE FROM blacksky_messages WHERE session_id = $1 AND received_at_ms < $2`
	PruneReceipts = `DELETE FROM blacksky_receipts WHERE session_id = $1 AND received_at_ms < $2`
	PruneSends    = `DELETE FROM blacksky_sends WHERE session_id = $1 AND state <> 'queued' AND finished_at_ms < $2`
)

// MessageStats is the newest seq (0: none) and how many messages are kept.
const MessageStats = `SELECT coalesce(max(seq), 0), count(*) FROM blacksky_messages WHERE session_id = $1`

// LastSeq is the session's counter, which survives pruning.
const LastSeq = `SELECT last_seq FROM blacksky_message_seqs WHERE session_id = $1`

// JobStats counts relay's jobs of one session by kind and state, with the
// oldest one's creation time in unix milliseconds. It reads River's own
// table: River's API lists jobs but does not count them, and this runs every
// heartbeat. Each database reads the JSON args its own way; $1 is the
// session.
const (
	PostgresJobStats = `SELECT kind, state, count(*), coalesce((extract(epoch FROM min(created_at)) * 1000)::bigint, 0)
FROM river_job WHERE kind LIKE 'blacksky_relay_%' AND args->>'session' = $1 GROUP BY kind, state`
	SQLiteJobStats = `SELECT kind, state, count(*), coalesce(CAST(unixepoch(min(created_at), 'subsec') * 1000 AS INTEGER), 0)
FROM river_job WHERE kind LIKE 'blacksky_relay_%' AND json_extract(args, '$.session') = $1 GROUP BY kind, state`
)
