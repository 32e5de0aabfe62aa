package relay

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// storeTimeout bounds one P.relay.store: the gateway's request waits about
// as long, and an answer after it has given up helps nobody.
const storeTimeout = 10 * time.Second

// errNotReady answers requests while the database is not open yet.
var errNotReady = errors.New("relay is not ready: the database is not open yet")

// onStore serves P.relay.store: the item and its delivery jobs are
// committed in one transaction, then the gateway hears ok and lets whatsmeow
// acknowledge the message to WhatsApp. Any failure is answered ok:false
// (nothing stored), so WhatsApp delivers it again.
func (s *Service) onStore(m *nats.Msg) {
	req, err := bus.DecodeRelayStore(m.Data)
	if err != nil {
		s.respond(m, bus.RelayStoreReply{Error: err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	var rep bus.RelayStoreReply
	if req.Message != nil {
		rep, err = s.StoreMessage(ctx, *req.Message)
	} else {
		rep, err = s.StoreReceipt(ctx, *req.Receipt)
	}
	if err != nil {
		s.log.Warn("relay.store refused; WhatsApp will deliver it again", "err", err)
		rep = bus.RelayStoreReply{Error: err.Error()}
	}
	s.respond(m, rep)
}

// StoreMessage stores one incoming message and its delivery jobs, or finds
// it stored (a redelivery: Duplicate, with its first seq).
func (s *Service) StoreMessage(ctx context.Context, msg bus.MsgIn) (bus.RelayStoreReply, error) {
	st, q := s.backend()
	if st == nil || q == nil {
		return bus.RelayStoreReply{}, errNotReady
	}
	now := s.clock.Now()
	msg.Session, msg.Seq = s.cfg.Session, 0
	if msg.At.IsZero() {
		msg.At = now.UTC()
	}
	payload, err := s.codec.Seal(msg)
	if err != nil {
		return bus.RelayStoreReply{}, err
	}
	seq, dup, err := st.InsertMessage(ctx, NewMessage{Session: s.cfg.Session, Chat: msg.Chat, WAID: msg.ID,
		ReceivedAt: now, Payload: payload}, func(ctx context.Context, tx Tx, seq int64) error {
		return tx.InsertJobs(ctx, s.deliveries("msg.in", DeliveryArgs{Session: s.cfg.Session, Item: ItemMessage, Ref: seq, Chat: msg.Chat}))
	})
	s.dbResult(err)
	if err != nil {
		return bus.RelayStoreReply{}, err
	}
	return bus.RelayStoreReply{OK: true, Seq: seq, Duplicate: dup}, nil
}

// StoreReceipt stores one receipt and its delivery jobs once.
func (s *Service) StoreReceipt(ctx context.Context, rc bus.Receipt) (bus.RelayStoreReply, error) {
	st, q := s.backend()
	if st == nil || q == nil {
		return bus.RelayStoreReply{}, errNotReady
	}
	now := s.clock.Now()
	rc.Session = s.cfg.Session
	if rc.At.IsZero() {
		rc.At = now.UTC()
	}
	payload, err := s.codec.Seal(rc)
	if err != nil {
		return bus.RelayStoreReply{}, err
	}
	_, dup, err := st.InsertReceipt(ctx, NewReceipt{Session: s.cfg.Session, Dedup: receiptKey(rc), Chat: rc.Chat,
		ReceivedAt: now, Payload: payload}, func(ctx context.Context, tx Tx, id int64) error {
		return tx.InsertJobs(ctx, s.deliveries("msg.receipt", DeliveryArgs{Session: s.cfg.Session, Item: ItemReceipt, Ref: id, Chat: rc.Chat}))
	})
	s.dbResult(err)
	if err != nil {
		return bus.RelayStoreReply{}, err
	}
	return bus.RelayStoreReply{OK: true, Duplicate: dup}, nil
}

// receiptKey identifies a receipt across redeliveries: what WhatsApp says
// in it, not when relay heard it.
func receiptKey(rc bus.Receipt) string {
	h := sha256.New()
	for _, part := range []string{rc.Chat, rc.Sender, rc.Type, rc.Timestamp.UTC().Format(time.RFC3339Nano), strings.Join(rc.IDs, ",")} {
		h.Write([]byte(part))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// deliveries are the jobs of one item: the bus always, the webhook when it
// takes event.
func (s *Service) deliveries(event string, a DeliveryArgs) []Job {
	out := []Job{{Channel: ChannelNATS, Delivery: a}}
	if s.cfg.wants(event) {
		out = append(out, Job{Channel: ChannelWebhook, Delivery: a})
	}
	return out
}

// dbResult keeps the heartbeat's database_ok truthful, and tells the
// outage filter of River's log what relay's own queries found.
func (s *Service) dbResult(err error) {
	if err != nil && !errors.Is(err, context.Canceled) {
		s.noteErr(err)
		s.setDBOK(false)
		if dboutage.ConnError(err) {
			s.outage.ConnFailed()
		}
		return
	}
	if err == nil {
		s.setDBOK(true)
		s.outage.OK()
	}
}

// respond answers a request. A reply subject outside the inboxes is a
// bot's mistake or forgery (bus.Respond refuses it), logged at debug; any
// other failure means a requester waits for nothing, logged at warn.
func (s *Service) respond(m *nats.Msg, v any) {
	if m.Reply == "" {
		return
	}
	if err := bus.Respond(m, v); err != nil {
		if errors.Is(err, bus.ErrReplySubject) {
			s.log.Debug("reply not sent", "subject", m.Subject, "err", err)
			return
		}
		s.log.Warn("reply not sent; the requester times out", "subject", m.Subject, "err", err)
	}
}

// replayShare is the part of NATS's payload limit a replay answer may use.
const replayShare = 0.75

// onReplay serves P.msg.replay: stored messages after a seq, in seq order,
// each shaped as on P.msg.in. The answer stays under NATS's payload limit:
// it stops early, and the bot asks again after the last seq it got.
func (s *Service) onReplay(m *nats.Msg) {
	req, err := bus.DecodeMsgReplay(m.Data)
	if err != nil {
		s.respond(m, bus.MsgReplayReply{Messages: []bus.MsgIn{}, Error: err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	msgs, err := s.Replay(ctx, req.AfterSeq, req.Limit, int(float64(s.opts.NC.MaxPayload())*replayShare))
	if err != nil {
		s.respond(m, bus.MsgReplayReply{Messages: []bus.MsgIn{}, Error: err.Error()})
		return
	}
	s.respond(m, bus.MsgReplayReply{OK: true, Messages: msgs})
}

// replayEnvelope is the JSON of an ok answer without its messages.
var replayEnvelope = func() int {
	b, _ := json.Marshal(bus.MsgReplayReply{OK: true, Messages: []bus.MsgIn{}})
	return len(b)
}()

// Replay returns up to limit stored messages after afterSeq (limit 0:
// Config.ReplayLimit) whose answer (bus.MsgReplayReply) is at most maxBytes
// of JSON (0: no bound). Each message is measured as encoded: JSON escapes
// '<', '>', '&' and control characters to six bytes each, so a text's
// length says little. A first message over maxBytes alone is an error
// naming its seq (the bot can ask past it). A message that cannot be opened
// (sealed under another key) is skipped with a warning.
func (s *Service) Replay(ctx context.Context, afterSeq int64, limit, maxBytes int) ([]bus.MsgIn, error) {
	st, _ := s.backend()
	if st == nil {
		return nil, errNotReady
	}
	if limit <= 0 {
		limit = s.cfg.ReplayLimit
	}
	limit = min(limit, s.cfg.ReplayMax)
	rows, err := st.Messages(ctx, s.cfg.Session, afterSeq, limit)
	s.dbResult(err)
	if err != nil {
		return nil, err
	}
	out := make([]bus.MsgIn, 0, len(rows))
	size := replayEnvelope
	for _, row := range rows {
		var msg bus.MsgIn
		if err := s.codec.Open(row.Payload, &msg); err != nil {
			s.log.Warn("replay: a stored message cannot be opened; skipped", "seq", row.Ref, "err", err)
			continue
		}
		msg.Seq = row.Ref
		b, err := json.Marshal(msg)
		if err != nil {
			return nil, fmt.Errorf("replay: encode seq %d: %w", row.Ref, err)
		}
		n := len(b)
		if len(out) > 0 {
			n++ // the comma between messages
		}
		if maxBytes > 0 && size+n > maxBytes {
			if len(out) == 0 {
				return nil, fmt.Errorf("message seq %d is %d bytes as JSON, more than a replay answer may carry (%d bytes, "+
					"3/4 of the NATS payload limit): it cannot be replayed; ask with after_seq %d to go on past it",
					row.Ref, len(b), maxBytes, row.Ref)
			}
			break
		}
		size += n
		out = append(out, msg)
	}
	return out, nil
}

// onRetry serves P.relay.retry (blacksky deliveries retry).
func (s *Service) onRetry(m *nats.Msg) {
	if err := bus.DecodeRelayRetry(m.Data); err != nil {
		s.respond(m, bus.RelayRetryReply{Error: err.Error()})
		return
	}
	_, q := s.backend()
	if q == nil {
		s.respond(m, bus.RelayRetryReply{Error: errNotReady.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(s.stopCtx, time.Minute)
	defer cancel()
	n, err := q.RetryDead(ctx, s.cfg.Session, func(ctx context.Context, a DeliveryArgs) bool {
		_, err := s.render(ctx, a)
		return errors.Is(err, ErrNotFound)
	})
	if err != nil {
		s.respond(m, bus.RelayRetryReply{Retried: n, Error: err.Error()})
		return
	}
	// A queued send whose job is dead (discarded) is dead too, for the
	// operator: it goes out again as well.
	sends, err := s.requeueSends(ctx)
	n += sends
	if err != nil {
		s.respond(m, bus.RelayRetryReply{Retried: n, Error: "queued sends: " + err.Error()})
		return
	}
	s.log.Info("dead deliveries queued again", "count", n)
	s.respond(m, bus.RelayRetryReply{OK: true, Retried: n})
}

// onConn forwards P.conn.* events the webhook takes. They are not stored
// as rows: the event rides in its job's args.
func (s *Service) onConn(m *nats.Msg) {
	kind := bus.Kind(m.Subject)
	event := "conn." + kind
	if !s.cfg.wants(event) {
		return
	}
	if _, err := bus.DecodeConnEvent(kind, m.Data); err != nil {
		s.log.Debug("conn event ignored", "subject", m.Subject, "err", err)
		return
	}
	_, q := s.backend()
	if q == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	err := q.Insert(ctx, []Job{{Channel: ChannelWebhook, Delivery: DeliveryArgs{Session: s.cfg.Session, Item: ItemConn,
		Event: event, Body: m.Data}}})
	s.dbResult(err)
	if err != nil {
		s.log.Warn("conn event not queued for the webhook", "event", event, "err", err)
	}
}
