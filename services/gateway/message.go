package gateway

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/proto/waE2E"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
)

// MsgIn converts an incoming whatsmeow message into its P.msg.in payload
// (without the session and time stamp).
func MsgIn(e *events.Message) bus.MsgIn {
	typ, text := content(e.Message)
	return bus.MsgIn{
		ID:        e.Info.ID,
		Chat:      e.Info.Chat.String(),
		Sender:    e.Info.Sender.ToNonAD().String(),
		FromMe:    e.Info.IsFromMe,
		PushName:  e.Info.PushName,
		Timestamp: e.Info.Timestamp.UTC(),
		Type:      typ,
		Text:      text,
	}
}

// content names a message's type and pulls out its text or caption.
func content(m *waE2E.Message) (typ, text string) {
	switch {
	case m == nil:
		return "unknown", ""
	case m.Conversation != nil:
		return "text", m.GetConversation()
	case m.ExtendedTextMessage != nil:
		return "text", m.GetExtendedTextMessage().GetText()
	case m.ImageMessage != nil:
		return "image", m.GetImageMessage().GetCaption()
	case m.VideoMessage != nil:
		return "video", m.GetVideoMessage().GetCaption()
	case m.AudioMessage != nil:
		return "audio", ""
	case m.DocumentMessage != nil:
		return "document", m.GetDocumentMessage().GetCaption()
	case m.StickerMessage != nil:
		return "sticker", ""
	case m.ReactionMessage != nil:
		return "reaction", m.GetReactionMessage().GetText()
	case m.LocationMessage != nil, m.LiveLocationMessage != nil:
		return "location", ""
	case m.ContactMessage != nil, m.ContactsArrayMessage != nil:
		return "contact", ""
	case m.PollCreationMessage != nil:
		return "poll", m.GetPollCreationMessage().GetName()
	case m.PollCreationMessageV3 != nil:
		return "poll", m.GetPollCreationMessageV3().GetName()
	case m.ProtocolMessage != nil:
		return "protocol", ""
	}
	return "other", ""
}

// onMessage hands an incoming message to relay and reports whether it may
// be acknowledged: only once relay has stored it. An owner command runs
// once per message: after its first store, never on a redelivery relay
// already had (Duplicate), and never for a message that may come again.
func (g *Gateway) onMessage(e *events.Message) bool {
	in := MsgIn(e)
	now := g.clock.Now()
	in.Stamp(g.cfg.Session, now)
	reply, ok := g.store(bus.RelayStoreRequest{Message: &in}, "message", in.ID, true)
	if !ok {
		return false
	}
	if reply.Duplicate || !g.isOwner(e.Info.MessageSource) {
		return true
	}
	cmd, ok := ParseCommand(in.Text, g.cfg.Prefix)
	if !ok {
		return true
	}
	latency := now.Sub(e.Info.Timestamp)
	chat := e.Info.Chat
	g.log.Info("owner command", "command", cmd)
	g.later("owner command "+cmd, func(ctx context.Context) {
		g.reply(ctx, chat, g.answer(ctx, cmd, latency))
	})
	return true
}

// isOwner compares the sender's phone number with OWNER_NUMBER. A sender
// may be addressed by LID (a hidden id, not the phone number); whatsmeow then
// gives the phone-number JID as SenderAlt, so both are checked.
func (g *Gateway) isOwner(src types.MessageSource) bool {
	if g.cfg.OwnerNumber == "" {
		return false
	}
	for _, j := range []types.JID{src.Sender, src.SenderAlt} {
		if j.Server == types.DefaultUserServer && j.User == g.cfg.OwnerNumber {
			return true
		}
	}
	return false
}

// Owner commands.
const (
	CmdPing   = "ping"
	CmdStatus = "status"
	CmdBackup = "backup"
)

// ParseCommand reads "<prefix><command> ..." and returns a known command.
func ParseCommand(text, prefix string) (string, bool) {
	text = strings.TrimSpace(text)
	if prefix == "" || !strings.HasPrefix(text, prefix) {
		return "", false
	}
	fields := strings.Fields(text[len(prefix):])
	if len(fields) == 0 {
		return "", false
	}
	switch cmd := strings.ToLower(fields[0]); cmd {
	case CmdPing, CmdStatus, CmdBackup:
		return cmd, true
	}
	return "", false
}

// answer builds the reply to an owner command; it runs on the worker.
func (g *Gateway) answer(ctx context.Context, cmd string, latency time.Duration) string {
	switch cmd {
	case CmdPing:
		return fmt.Sprintf("pong: your message reached the bot %s after you sent it", latency.Round(time.Millisecond))
	case CmdStatus:
		return g.statusText()
	case CmdBackup:
		return g.backupNow(ctx)
	}
	return ""
}

func (g *Gateway) statusText() string {
	now := g.clock.Now()
	g.mu.Lock()
	st := g.st
	g.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "state: %s\n", st.state)
	fmt.Fprintf(&b, "uptime: %s\n", now.Sub(st.started).Round(time.Second))
	if !st.connectedSince.IsZero() {
		fmt.Fprintf(&b, "connected for: %s\n", now.Sub(st.connectedSince).Round(time.Second))
	}
	fmt.Fprintf(&b, "reconnects: %d\n", st.reconnects)
	if st.lastDisconnect != "" {
		fmt.Fprintf(&b, "last disconnect: %s\n", st.lastDisconnect)
	}
	switch s := st.lastSnapshot; {
	case !g.cfg.BackupEnabled:
		b.WriteString("backup: disabled")
	case s == nil:
		b.WriteString("last snapshot: none seen since start")
	default:
		fmt.Fprintf(&b, "last snapshot: #%d (%s) %s ago, %d bytes", s.SnapshotID, s.Reason, now.Sub(s.At).Round(time.Second), s.Bytes)
		if s.Unchanged {
			b.WriteString(", unchanged")
		}
	}
	return b.String()
}

// backupNow asks the backup service for a snapshot and words its answer.
func (g *Gateway) backupNow(ctx context.Context) string {
	if !g.cfg.BackupEnabled {
		return "backup is disabled (ENABLE_SESSION_BACKUP=false)"
	}
	rctx, cancel := context.WithTimeout(ctx, g.cfg.BackupTimeout)
	defer cancel()
	var reply bus.BackupReply
	err := bus.Request(rctx, g.nc, g.subj.BackupRequest(), bus.BackupRequest{Reason: bus.ReasonManual}, &reply)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return "backup is not answering: no backup service is running"
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
		return fmt.Sprintf("backup is not answering: no reply within %s", g.cfg.BackupTimeout)
	case err != nil:
		g.log.Warn("owner backup request", "err", err)
		return "backup request failed: " + err.Error()
	case !reply.OK:
		return "backup failed: " + reply.Error
	case reply.Snapshot == nil:
		return fmt.Sprintf("backup done (job %d)", reply.JobID)
	case reply.Snapshot.Unchanged:
		return fmt.Sprintf("backup done: snapshot #%d, unchanged since the last one (%d bytes)", reply.Snapshot.ID, reply.Snapshot.Bytes)
	}
	return fmt.Sprintf("backup done: snapshot #%d, %d bytes", reply.Snapshot.ID, reply.Snapshot.Bytes)
}

// notifyOwner sends text to OWNER_NUMBER, off the loop.
func (g *Gateway) notifyOwner(text string) {
	if g.cfg.OwnerNumber == "" {
		return
	}
	to := types.NewJID(g.cfg.OwnerNumber, types.DefaultUserServer)
	g.later("owner alert", func(ctx context.Context) { g.reply(ctx, to, text) })
}

// reply sends text if the socket is up, in its turn under SEND_RATE (waiting
// up to OwnerSendWait for the slot); a failure is only logged.
func (g *Gateway) reply(ctx context.Context, to types.JID, text string) {
	if g.liveConn() == nil {
		g.log.Warn("owner reply dropped: not connected")
		return
	}
	now := g.clock.Now()
	r := g.limiter.ReserveN(now, 1)
	if wait := r.DelayFrom(now); !r.OK() || wait > OwnerSendWait {
		r.CancelAt(now)
		g.log.Warn("owner reply dropped: SEND_RATE has no slot soon enough", "next_slot_in", wait)
		return
	} else if wait > 0 && !g.sleepUntil(now.Add(wait), ctx.Done()) {
		r.CancelAt(g.clock.Now())
		return
	}
	conn := g.liveConn()
	if conn == nil {
		g.log.Warn("owner reply dropped: not connected")
		return
	}
	sctx, cancel := context.WithTimeout(ctx, g.cfg.SendTimeout)
	defer cancel()
	if _, err := conn.SendText(sctx, to, text); err != nil {
		g.log.Warn("owner reply failed", "err", err)
	}
}

// liveConn returns the Conn when WhatsApp is connected and logged in.
func (g *Gateway) liveConn() Conn {
	g.mu.Lock()
	conn, state := g.conn, g.st.state
	g.mu.Unlock()
	// IsConnected takes whatsmeow's socket lock, which a dial holds for as
	// long as it lasts: never call it under g.mu, or heartbeats would stall.
	if conn == nil || state != bus.StateConnected || !conn.IsConnected() {
		return nil
	}
	return conn
}
