package relay

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/riverqueue/river"
)

// rendered is one item as it goes out.
type rendered struct {
	event   string // msg.in, msg.receipt, msg.sent, msg.send_failed, conn.<kind>
	subject string
	body    []byte
	// id is the same on every delivery of the item: JetStream's Nats-Msg-Id
	// and the webhook's X-Blacksky-Delivery.
	id string
}

// deliver makes one delivery job's delivery. An item pruned meanwhile
// (MESSAGE_RETENTION) or one that cannot be opened (sealed under another
// SESSION_ENCRYPTION_KEY) has nothing left to deliver: dead at once,
// saying why, so /status and River UI count it.
func (s *Service) deliver(ctx context.Context, channel string, job JobInfo, a DeliveryArgs) error {
	r, err := s.render(ctx, a)
	switch {
	case errors.Is(err, ErrNotFound):
		s.log.Warn("delivery dead: its item was deleted by MESSAGE_RETENTION before it could be delivered", "item", a.Item, "ref", a.Ref,
			"channel", channel)
		return river.JobCancel(fmt.Errorf("the %s was deleted by MESSAGE_RETENTION before it could be delivered", a.Item))
	case errors.Is(err, snapshot.ErrWrongKey), errors.Is(err, snapshot.ErrNeedKey), errors.Is(err, snapshot.ErrCorrupt):
		return river.JobCancel(fmt.Errorf("stored %s cannot be opened: %w", a.Item, err))
	case err != nil:
		return err
	}
	switch channel {
	case ChannelNATS:
		return s.publish(ctx, r)
	case ChannelWebhook:
		return s.post(ctx, job, r)
	}
	return river.JobCancel(fmt.Errorf("unknown channel %q", channel))
}

// render loads and opens the item of a delivery.
func (s *Service) render(ctx context.Context, a DeliveryArgs) (rendered, error) {
	st, _ := s.backend()
	if st == nil {
		return rendered{}, errNotReady
	}
	var (
		r   rendered
		v   any
		row Stored
		err error
	)
	switch a.Item {
	case ItemMessage:
		if row, err = st.Message(ctx, a.Session, a.Ref); err != nil {
			return r, err
		}
		var msg bus.MsgIn
		if err := s.codec.Open(row.Payload, &msg); err != nil {
			return r, err
		}
		msg.Seq = row.Ref
		r = rendered{event: "msg.in", subject: s.subj.MsgIn(), id: "msg." + strconv.FormatInt(row.Ref, 10)}
		v = msg
	case ItemReceipt:
		if row, err = st.Receipt(ctx, a.Session, a.Ref); err != nil {
			return r, err
		}
		var rc bus.Receipt
		if err := s.codec.Open(row.Payload, &rc); err != nil {
			return r, err
		}
		r = rendered{event: "msg.receipt", subject: s.subj.MsgReceipt(), id: "receipt." + strconv.FormatInt(row.Ref, 10)}
		v = rc
	case ItemSend:
		sd, err := st.GetSend(ctx, a.Session, a.Key)
		if err != nil {
			return r, err
		}
		out, err := s.outcomeEvent(sd)
		if err != nil {
			return r, err
		}
		r = rendered{event: "msg.sent", subject: s.subj.MsgSent(), id: "send." + sd.Key + "." + sd.State}
		if sd.State == SendFailed {
			r.event, r.subject = "msg.send_failed", s.subj.MsgSendFailed()
		}
		v = out
	case ItemConn:
		sum := sha256.Sum256(a.Body)
		return rendered{event: a.Event, subject: s.subj.Prefix + "." + a.Event, body: a.Body,
			id: a.Event + "." + hex.EncodeToString(sum[:12])}, nil
	default:
		return r, river.JobCancel(fmt.Errorf("unknown item %q", a.Item))
	}
	if r.body, err = json.Marshal(v); err != nil {
		return r, err
	}
	return r, nil
}

// outcomeEvent is P.msg.sent or P.msg.send_failed of a finished send.
func (s *Service) outcomeEvent(sd Send) (bus.MsgSendOutcome, error) {
	var req bus.MsgSend
	if err := s.codec.Open(sd.Payload, &req); err != nil {
		return bus.MsgSendOutcome{}, err
	}
	out := bus.MsgSendOutcome{IdempotencyKey: sd.Key, To: req.To, ID: sd.Outcome.WAID, Error: sd.Outcome.Error}
	if !sd.Outcome.SentAt.IsZero() {
		ts := sd.Outcome.SentAt
		out.Timestamp = &ts
	}
	out.Stamp(s.cfg.Session, sd.Outcome.FinishedAt)
	return out, nil
}

// publish puts an item on the bus: into the session's JetStream stream,
// waiting for its ack (Nats-Msg-Id makes a repeat a no-op within the
// stream's duplicate window), or with a core publish confirmed by a flush.
// Core subscribers receive it either way.
func (s *Service) publish(ctx context.Context, r rendered) error {
	js, err := s.jetStreamFor(ctx)
	if err != nil {
		return err
	}
	if js != nil {
		if _, err := js.PublishMsg(ctx, jsMsg(r)); err != nil {
			return fmt.Errorf("jetstream publish %s: %w", r.subject, err)
		}
		return nil
	}
	if err := s.opts.NC.Publish(r.subject, r.body); err != nil {
		return fmt.Errorf("publish %s: %w", r.subject, err)
	}
	if err := s.opts.NC.FlushWithContext(ctx); err != nil {
		return fmt.Errorf("publish %s: %w", r.subject, err)
	}
	return nil
}
