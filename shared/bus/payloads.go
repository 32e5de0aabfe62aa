package bus

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// Event is the part every event carries.
type Event struct {
	Session string    `json:"session"`
	At      time.Time `json:"at"`
}

// Stamp sets the session and the time (UTC) of an event.
func (e *Event) Stamp(session string, at time.Time) {
	e.Session = session
	e.At = at.UTC()
}

// ConnEvent is P.conn.<kind>. Only the fields of its kind are set.
type ConnEvent struct {
	Event
	Kind      string     `json:"kind"`
	Attempt   int        `json:"attempt,omitempty"`
	DelayMS   int64      `json:"delay_ms,omitempty"`
	Code      string     `json:"code,omitempty"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	JID       string     `json:"jid,omitempty"`
	Reason    string     `json:"reason,omitempty"`
	// Instance is set on standby: the instance whose backup says it, so only
	// that instance's gateway acts on it.
	Instance string `json:"instance,omitempty"`
}

// Heartbeat is P.heartbeat.<service>, published every HeartbeatInterval.
type Heartbeat struct {
	Event
	Service  string `json:"service"`
	Instance string `json:"instance"`
	State    string `json:"state"`
	UptimeS  int64  `json:"uptime_s"`
	// Details is the service's own struct: GatewayDetails, BackupDetails or
	// HealthDetails.
	Details json.RawMessage `json:"details,omitempty"`
}

// Gateway states, in heartbeats and /status.
const (
	StateStarting       = "starting"
	StateWaitingRestore = "waiting_restore" // asking backup to restore before opening the store
	StateStandby        = "standby"         // another instance holds the session
	StateConnecting     = "connecting"
	StateConnected      = "connected"
	StatePairing        = "pairing" // connected, waiting for a QR scan or pairing code
	StateReconnecting   = "reconnecting"
	StateLoggedOut      = "logged_out"
	StateStreamReplaced = "stream_replaced"
	StateBanned         = "temporary_ban"
	StateOutdated       = "client_outdated"
	StateStopped        = "stopped"
)

// Service-level heartbeat states of backup and health.
const (
	StateOK       = "ok"
	StateDegraded = "degraded" // database unreachable: local fallback only
	StateDisabled = "disabled"
	StateStopping = "stopping"
)

// GatewayDetails are the gateway's heartbeat details. JID and pairing codes
// travel on the (token-protected) bus only; health masks or withholds them.
type GatewayDetails struct {
	WAState        string     `json:"wa_state"`
	JID            string     `json:"jid,omitempty"`
	ConnectedSince *time.Time `json:"connected_since,omitempty"`
	Reconnects     int64      `json:"reconnects"`
	Attempt        int        `json:"attempt,omitempty"`
	LastDisconnect string     `json:"last_disconnect,omitempty"`
	// While pairing: the current QR code or pairing code, so a health service
	// that starts late can show it without waiting for the next rotation.
	QRCode      string     `json:"qr_code,omitempty"`
	QRExpiresAt *time.Time `json:"qr_expires_at,omitempty"`
	PairCode    string     `json:"pair_code,omitempty"`
	// Relay hand-over (issue 11): incoming messages and receipts relay did
	// not confirm (no reply, an error, a timeout), so left unacknowledged
	// for WhatsApp to deliver again, counted since the gateway started;
	// the last such failure and when.
	RelayUnacked     int64      `json:"relay_unacked"`
	LastRelayError   string     `json:"last_relay_error,omitempty"`
	LastRelayErrorAt *time.Time `json:"last_relay_error_at,omitempty"`
	// Reconnects the gateway made, since it started, so that WhatsApp
	// redelivers what relay could not store once relay was back (at most
	// one a minute).
	RelayRedeliveryReconnects int64 `json:"relay_redelivery_reconnects"`
}

// BackupDetails are the backup service's heartbeat details.
type BackupDetails struct {
	Database          string     `json:"database"` // "postgres" or "sqlite"
	DatabaseOK        bool       `json:"database_ok"`
	LeaseHeld         bool       `json:"lease_held"`
	LastSnapshotID    int64      `json:"last_snapshot_id,omitempty"`
	LastSnapshotAt    *time.Time `json:"last_snapshot_at,omitempty"`
	LastSnapshotBytes int64      `json:"last_snapshot_bytes,omitempty"`
	LastError         string     `json:"last_error,omitempty"`
	LastErrorAt       *time.Time `json:"last_error_at,omitempty"`
	// While standby: the lease's holder, and for how long this backup has
	// seen its row unchanged with the database answering (it takes the
	// lease at one lease TTL; a holder that cannot renew fences itself when
	// it hears of half of it).
	LeaseHolder  string `json:"lease_holder,omitempty"`
	LeaseWatchMS int64  `json:"lease_watch_ms,omitempty"`
	// Continuous replication (SYNC_INTERVAL > 0): the lease generation
	// points are written under, how old the oldest committed write not yet
	// shipped is (0: nothing waiting), the stored points and bytes of this
	// session (bases, deltas and their pieces), and when the last point,
	// base and compaction were stored.
	Generation       int64      `json:"generation,omitempty"`
	ReplicationLagMS int64      `json:"replication_lag_ms"`
	Points           int64      `json:"points,omitempty"`
	StoredBytes      int64      `json:"stored_bytes,omitempty"`
	LastPointAt      *time.Time `json:"last_point_at,omitempty"`
	LastBaseAt       *time.Time `json:"last_base_at,omitempty"`
	LastCompactionAt *time.Time `json:"last_compaction_at,omitempty"`
}

// HealthDetails are the health service's heartbeat details.
type HealthDetails struct {
	Addr string `json:"addr"`
}

// HeartbeatInterval is how often every service beats; a heartbeat older than
// StaleAfter intervals is stale.
const (
	HeartbeatInterval = 5 * time.Second
	StaleAfter        = 3
)

// BackupRequest is P.backup.request.
type BackupRequest struct {
	Reason string `json:"reason,omitempty"`
}

// SnapshotRef describes the snapshot that answered a request.
type SnapshotRef struct {
	ID        int64  `json:"id"`
	Bytes     int64  `json:"bytes"`
	SHA256    string `json:"sha256"`
	Unchanged bool   `json:"unchanged"`
}

// BackupReply answers a P.backup.request.
type BackupReply struct {
	OK       bool         `json:"ok"`
	JobID    int64        `json:"job_id,omitempty"`
	Snapshot *SnapshotRef `json:"snapshot,omitempty"`
	// Stored says where the snapshot is kept when ok: StoredDatabase (a new
	// dyno restores it) or StoredLocal (this disk only: the database did
	// not answer).
	Stored string `json:"stored,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Where a snapshot is kept (BackupReply.Stored).
const (
	StoredDatabase = "database"
	StoredLocal    = "local"
)

// BackupDone is P.backup.done.
type BackupDone struct {
	Event
	SnapshotID  int64  `json:"snapshot_id"`
	Reason      string `json:"reason"`
	Bytes       int64  `json:"bytes"`
	StoredBytes int64  `json:"stored_bytes"`
	SHA256      string `json:"sha256"`
	DurationMS  int64  `json:"duration_ms"`
	Unchanged   bool   `json:"unchanged"`
	JobID       int64  `json:"job_id,omitempty"`
}

// BackupFailed is P.backup.failed.
type BackupFailed struct {
	Event
	Reason  string `json:"reason"`
	Error   string `json:"error"`
	Attempt int    `json:"attempt"`
}

// Restore sources.
const (
	SourceDatabase = "database"
	SourceLocal    = "local"
	SourceNone     = "none"
	SourceExisting = "existing"
)

// RestoreReply answers P.session.restore.
type RestoreReply struct {
	OK         bool   `json:"ok"`
	Restored   bool   `json:"restored"`
	Source     string `json:"source,omitempty"`
	SnapshotID int64  `json:"snapshot_id,omitempty"`
	Error      string `json:"error,omitempty"`
	// Instance is the answering backup's instance: a gateway takes the
	// answer of its own instance only.
	Instance string `json:"instance,omitempty"`
}

// MsgIn is P.msg.in.
type MsgIn struct {
	Event
	ID        string    `json:"id"`
	Chat      string    `json:"chat"`
	Sender    string    `json:"sender"`
	FromMe    bool      `json:"from_me"`
	PushName  string    `json:"push_name"`
	Timestamp time.Time `json:"timestamp"`
	Type      string    `json:"type"`
	Text      string    `json:"text"`
	// Seq is relay's per-session sequence number: increasing, and the same
	// on every delivery of one message.
	Seq int64 `json:"seq,omitempty"`
}

// MsgSend is a P.msg.send request.
type MsgSend struct {
	To   string `json:"to"`
	Text string `json:"text"`
	// IdempotencyKey makes a send go out once per key, however often it is
	// asked; empty: relay draws one.
	IdempotencyKey string `json:"idempotency_key,omitempty"`
	// Wait false answers once the send is queued; nil or true waits for it.
	Wait *bool `json:"wait,omitempty"`
}

// MsgSendReply answers P.msg.send.
type MsgSendReply struct {
	OK        bool       `json:"ok"`
	ID        string     `json:"id,omitempty"`
	Timestamp *time.Time `json:"timestamp,omitempty"`
	Error     string     `json:"error,omitempty"`
	// Queued and IdempotencyKey answer a send that was queued (wait false).
	Queued         bool   `json:"queued,omitempty"`
	IdempotencyKey string `json:"idempotency_key,omitempty"`
}

// MaxTextLen bounds an outgoing message; WhatsApp itself cuts near 65536.
const MaxTextLen = 65536

// decodeStrict decodes one JSON object into v, refusing unknown fields,
// trailing data and anything that is not an object.
func decodeStrict(data []byte, v any) error {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return errors.New("payload must be a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("bad JSON: data after the object")
	}
	return nil
}

// decodeEvent decodes an event strictly and requires its time: an event
// without one cannot be ordered against the others.
func decodeEvent(data []byte, v any, ev *Event) error {
	if err := decodeStrict(data, v); err != nil {
		return err
	}
	if ev.At.IsZero() {
		return errors.New(`"at" is required`)
	}
	return nil
}

// DecodeConnEvent reads a P.conn.<kind> event: unknown fields are refused,
// "at" is required and "kind" must be the subject's.
func DecodeConnEvent(kind string, data []byte) (ConnEvent, error) {
	var ev ConnEvent
	if err := decodeEvent(data, &ev, &ev.Event); err != nil {
		return ConnEvent{}, err
	}
	if ev.Kind != kind {
		return ConnEvent{}, fmt.Errorf(`"kind" %.32q does not match the subject's %.32q`, ev.Kind, kind)
	}
	return ev, nil
}

// DecodeBackupDone reads a P.backup.done event: unknown fields are
// refused, "at" is required.
func DecodeBackupDone(data []byte) (BackupDone, error) {
	var ev BackupDone
	if err := decodeEvent(data, &ev, &ev.Event); err != nil {
		return BackupDone{}, err
	}
	return ev, nil
}

// DecodeBackupFailed reads a P.backup.failed event: unknown fields are
// refused, "at" is required.
func DecodeBackupFailed(data []byte) (BackupFailed, error) {
	var ev BackupFailed
	if err := decodeEvent(data, &ev, &ev.Event); err != nil {
		return BackupFailed{}, err
	}
	return ev, nil
}

// Snapshot reasons. A request on the bus may name only RequestReasons; the
// others are the backup service's own.
const (
	ReasonManual       = "manual"
	ReasonScheduled    = "scheduled"
	ReasonShutdown     = "shutdown"
	ReasonPaired       = "paired"
	ReasonRestorePoint = "restore-point"
)

// requestReasons are the reasons a P.backup.request may name. The set is
// fixed: every reason recorded is one an operator can read, and metrics
// labels stay bounded.
var requestReasons = []string{ReasonManual, ReasonScheduled, ReasonRestorePoint}

// RequestReasons returns the reasons a P.backup.request may name, a copy:
// no caller can widen what the bus accepts.
func RequestReasons() []string { return slices.Clone(requestReasons) }

// DecodeBackupRequest reads a P.backup.request body. An empty body means a
// manual snapshot; a reason is one of RequestReasons.
func DecodeBackupRequest(data []byte) (BackupRequest, error) {
	var r BackupRequest
	if len(bytes.TrimSpace(data)) == 0 {
		return BackupRequest{Reason: ReasonManual}, nil
	}
	if err := decodeStrict(data, &r); err != nil {
		return BackupRequest{}, err
	}
	if r.Reason == "" {
		r.Reason = ReasonManual
	}
	if !slices.Contains(requestReasons, r.Reason) {
		shown := r.Reason
		if len(shown) > 32 {
			shown = shown[:32] + "..."
		}
		return BackupRequest{}, fmt.Errorf("reason: one of %s, got %q", strings.Join(requestReasons, ", "), shown)
	}
	return r, nil
}

// DecodeMsgSend reads a P.msg.send body: "to" and a non-empty "text" are
// required; "idempotency_key", when given, is 1 to MaxIdempotencyLen
// printable ASCII characters without spaces. The recipient's form is checked by the gateway, which knows JIDs.
func DecodeMsgSend(data []byte) (MsgSend, error) {
	var m MsgSend
	if err := decodeStrict(data, &m); err != nil {
		return MsgSend{}, err
	}
	switch {
	case m.To == "":
		return MsgSend{}, errors.New(`"to" is required`)
	case m.Text == "":
		return MsgSend{}, errors.New(`"text" is required`)
	case len(m.Text) > MaxTextLen:
		return MsgSend{}, fmt.Errorf(`"text" is longer than %d bytes`, MaxTextLen)
	case len(m.IdempotencyKey) > MaxIdempotencyLen:
		return MsgSend{}, fmt.Errorf(`"idempotency_key" is longer than %d bytes`, MaxIdempotencyLen)
	}
	for _, r := range m.IdempotencyKey {
		// Printable ASCII without spaces: it is shown in logs, events and
		// the CLI as it is.
		if r <= ' ' || r > '~' {
			return MsgSend{}, errors.New(`"idempotency_key": printable ASCII without spaces only`)
		}
	}
	return m, nil
}
