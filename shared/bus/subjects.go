// Package bus is the wire contract of CONTRACT section 3 in one place: the
// NATS subjects, the payload types and their strict decoders, the embedded
// server and how every process connects to it.
package bus

import (
	"fmt"
	"strings"
)

// Subjects builds every subject of one session. The prefix is
// "blacksky.<session>", the session lower-cased with every character outside
// [a-z0-9_-] replaced by '_'.
type Subjects struct {
	Prefix string
}

// NewSubjects returns the subjects of sessionID.
func NewSubjects(sessionID string) Subjects {
	return Subjects{Prefix: "blacksky." + SessionToken(sessionID)}
}

// SessionToken is the subject-safe form of a SESSION_ID.
func SessionToken(sessionID string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(sessionID) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// InstanceToken is the subject-safe form of an instance id: every character
// outside [A-Za-z0-9_-] becomes '-', and it is cut to MaxInstanceLen.
func InstanceToken(id string) string {
	var b strings.Builder
	for _, r := range id {
		if (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') || r == '_' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
		if b.Len() >= MaxInstanceLen {
			break
		}
	}
	return b.String()
}

// MaxInstanceLen bounds an instance id.
const MaxInstanceLen = 64

// CheckInstance refuses an instance id that is empty or not subject-safe.
func CheckInstance(id string) error {
	if id == "" || len(id) > MaxInstanceLen || InstanceToken(id) != id {
		return fmt.Errorf("instance id %q: want 1 to %d characters of [A-Za-z0-9_-]", id, MaxInstanceLen)
	}
	return nil
}

// Connection event kinds (P.conn.<kind>).
const (
	ConnConnecting        = "connecting"
	ConnConnected         = "connected"
	ConnDisconnected      = "disconnected"
	ConnReconnecting      = "reconnecting"
	ConnQR                = "qr"
	ConnPairCode          = "pair_code"
	ConnPaired            = "paired"
	ConnLoggedOut         = "logged_out"
	ConnStreamReplaced    = "stream_replaced"
	ConnKeepaliveTimeout  = "keepalive_timeout"
	ConnKeepaliveRestored = "keepalive_restored"
	ConnTemporaryBan      = "temporary_ban"
	ConnClientOutdated    = "client_outdated"
	ConnConnectFailure    = "connect_failure"
	ConnStandby           = "standby"
	ConnStopped           = "stopped"
)

// ConnKinds lists every connection event kind.
var ConnKinds = []string{
	ConnConnecting, ConnConnected, ConnDisconnected, ConnReconnecting, ConnQR, ConnPairCode,
	ConnPaired, ConnLoggedOut, ConnStreamReplaced, ConnKeepaliveTimeout, ConnKeepaliveRestored,
	ConnTemporaryBan, ConnClientOutdated, ConnConnectFailure, ConnStandby, ConnStopped,
}

// Service names used in heartbeat subjects.
const (
	ServiceGateway = "gateway"
	ServiceBackup  = "backup"
	ServiceHealth  = "health"
)

// Conn is P.conn.<kind>.
func (s Subjects) Conn(kind string) string { return s.Prefix + ".conn." + kind }

// ConnAll matches every connection event.
func (s Subjects) ConnAll() string { return s.Prefix + ".conn.*" }

// Heartbeat is P.heartbeat.<service>.
func (s Subjects) Heartbeat(service string) string { return s.Prefix + ".heartbeat." + service }

// HeartbeatAll matches every heartbeat.
func (s Subjects) HeartbeatAll() string { return s.Prefix + ".heartbeat.*" }

// BackupRequest is P.backup.request.
func (s Subjects) BackupRequest() string { return s.Prefix + ".backup.request" }

// BackupDone is P.backup.done.
func (s Subjects) BackupDone() string { return s.Prefix + ".backup.done" }

// BackupFailed is P.backup.failed.
func (s Subjects) BackupFailed() string { return s.Prefix + ".backup.failed" }

// SessionRestoreFor is P.session.restore.<instance>: a gateway asks its own
// instance's backup only (see InstanceToken).
func (s Subjects) SessionRestoreFor(instance string) string {
	return s.Prefix + ".session.restore." + instance
}

// MsgIn is P.msg.in.
func (s Subjects) MsgIn() string { return s.Prefix + ".msg.in" }

// MsgSend is P.msg.send.
func (s Subjects) MsgSend() string { return s.Prefix + ".msg.send" }

// Kind returns the last token of a subject (the conn kind or heartbeat service).
func Kind(subject string) string {
	if i := strings.LastIndexByte(subject, '.'); i >= 0 {
		return subject[i+1:]
	}
	return subject
}
