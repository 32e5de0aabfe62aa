package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/internal/backoff"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/recipient"
	"github.com/nats-io/nats.go"
	"github.com/riverqueue/river"
)

// errQueueFull refuses a send while Config.MaxQueuedSends wait.
var errQueueFull = errors.New("too many sends queued")

// onSend serves P.msg.send: the send is queued (a row per idempotency key
// and a River job, in one transaction) and answered once sent, or at once
// with "wait": false. A key seen before is never queued again: its first
// outcome is the answer, or "queued" while it waits.
func (s *Service) onSend(m *nats.Msg) {
	fail := func(err string) { s.respond(m, bus.MsgSendReply{Error: err}) }
	req, err := bus.DecodeMsgSend(m.Data)
	if err != nil {
		fail(err.Error())
		return
	}
	// The gateway's own rule: a recipient it could never send to is
	// refused now, not queued to fail a SEND_RATE slot later.
	if _, err := recipient.Parse(req.To); err != nil {
		fail(err.Error())
		return
	}
	wait := req.Wait == nil || *req.Wait
	if req.IdempotencyKey == "" {
		req.IdempotencyKey = newKey()
	}
	req.Wait = nil
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	var done <-chan struct{}
	var deferred func() string
	if wait {
		var stop func()
		done, deferred, stop = s.waiters.add(req.IdempotencyKey)
		defer stop()
	}
	sd, err := s.QueueSend(ctx, req)
	if err != nil {
		fail(err.Error())
		return
	}
	if sd.State != SendQueued {
		s.respond(m, outcomeReply(sd))
		return
	}
	if !wait {
		s.respond(m, bus.MsgSendReply{OK: true, Queued: true, IdempotencyKey: sd.Key})
		return
	}
	s.respond(m, s.awaitSend(sd.Key, done, deferred))
}

func newKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "auto-" + hex.EncodeToString(b[:])
}

// QueueSend stores a send and its job, or returns the send already stored
// under its key.
func (s *Service) QueueSend(ctx context.Context, req bus.MsgSend) (Send, error) {
	st, q := s.backend()
	if st == nil || q == nil {
		return Send{}, errNotReady
	}
	payload, err := s.codec.Seal(req)
	if err != nil {
		return Send{}, err
	}
	sd, _, err := st.InsertSend(ctx, s.cfg.Session, req.IdempotencyKey, s.clock.Now(), payload, func(ctx context.Context, tx Tx) error {
		return tx.InsertJobs(ctx, []Job{{Send: &SendArgs{Session: s.cfg.Session, Key: req.IdempotencyKey}}})
	})
	s.dbResult(err)
	if err != nil {
		return Send{}, err
	}
	if sd.State == SendQueued {
		// Counted after the insert, so a repeat of a queued key is never
		// refused; a new send over the bound is, and is taken back.
		if n, err := st.CountQueuedSends(ctx, s.cfg.Session); err == nil && n > s.cfg.MaxQueuedSends {
			if _, err := st.FinishSend(ctx, s.cfg.Session, sd.Key, Outcome{State: SendFailed,
				Error: errQueueFull.Error(), FinishedAt: s.clock.Now()}, nil); err == nil {
				return Send{}, fmt.Errorf("%w: %d wait for SEND_RATE; not queued", errQueueFull, s.cfg.MaxQueuedSends)
			}
		}
	}
	return sd, nil
}

// awaitSend waits for a queued send's outcome until Config.SendWait; this
// process's worker signals done, and the row is read every few seconds in
// case another relay works the job. When an attempt is refused for a reason
// that passes (WhatsApp not connected, the gateway stopping) it answers at
// once, as the gateway did before sends were queued, saying the send stays
// queued: a bot waits seconds, not SendWait, to learn the session is down.
func (s *Service) awaitSend(key string, done <-chan struct{}, deferred func() string) bus.MsgSendReply {
	deadline := s.clock.NewTimer(s.cfg.SendWait)
	defer deadline.Stop()
	poll := s.clock.NewTicker(2 * time.Second)
	defer poll.Stop()
	for {
		select {
		case <-done:
			done = nil // closed: read once
			if why := deferred(); why != "" {
				return bus.MsgSendReply{Queued: true, IdempotencyKey: key,
					Error: why + "; the send stays queued and goes out once it can (P.msg.sent tells)"}
			}
		case <-poll.Chan():
		case <-s.stopping:
			return bus.MsgSendReply{Queued: true, IdempotencyKey: key,
				Error: "relay is stopping; the send stays queued and goes out once relay is back (P.msg.sent tells)"}
		case <-deadline.Chan():
			return bus.MsgSendReply{Queued: true, IdempotencyKey: key,
				Error: fmt.Sprintf("not sent within %s; it stays queued and goes out once it can (P.msg.sent tells)", s.cfg.SendWait)}
		}
		st, _ := s.backend()
		if st == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		sd, err := st.GetSend(ctx, s.cfg.Session, key)
		cancel()
		if err == nil && sd.State != SendQueued {
			return outcomeReply(sd)
		}
	}
}

// outcomeReply is a finished send as P.msg.send answers it.
func outcomeReply(sd Send) bus.MsgSendReply {
	if sd.State == SendSent {
		ts := sd.Outcome.SentAt
		return bus.MsgSendReply{OK: true, ID: sd.Outcome.WAID, Timestamp: &ts, IdempotencyKey: sd.Key}
	}
	return bus.MsgSendReply{Error: sd.Outcome.Error, IdempotencyKey: sd.Key}
}

// transientSend are the gateway's refusals that say nothing was sent and a
// later try may work.
var transientSend = []string{"not connected", "shutting down", "rate limited"}

// workSend is the send job: wait for a SEND_RATE slot, ask the gateway to
// send, and record the outcome in the transaction that completes the job.
func (s *Service) workSend(ctx context.Context, job JobInfo, a SendArgs, complete InTx) error {
	st, q := s.backend()
	if st == nil || q == nil {
		return errNotReady
	}
	sd, err := st.GetSend(ctx, a.Session, a.Key)
	if errors.Is(err, ErrNotFound) || err == nil && sd.State != SendQueued {
		return nil // already finished (or gone): completing the job is all
	}
	if err != nil {
		return err
	}
	var req bus.MsgSend
	if err := s.codec.Open(sd.Payload, &req); err != nil {
		return s.finishSend(ctx, sd.Key, Outcome{State: SendFailed, Error: "stored send cannot be opened: " + err.Error()}, complete)
	}
	last := job.Attempt >= job.MaxAttempts
	// A last attempt that relay's stop cut short is not the last: it
	// runs again when relay is back (cutByStop).
	cut := func() bool { return ctx.Err() != nil && s.isStopping() }
	if err := s.waitSlot(ctx); err != nil {
		if !last || cut() {
			return err
		}
		// River would discard the job and leave the send queued with
		// nothing to send it: the last attempt records why instead.
		return s.finishSend(ctx, sd.Key, Outcome{State: SendFailed, Error: fmt.Sprintf(
			"gave up after %d attempts: no SEND_RATE slot came within the attempt (%v)", job.Attempt, err)}, complete)
	}
	gctx, cancel := context.WithTimeout(ctx, s.cfg.GatewayTimeout)
	var rep bus.MsgSendReply
	err = bus.Request(gctx, s.opts.NC, s.subj.GatewaySend(), req, &rep)
	cancel()
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		// No gateway subscribed: nothing was sent. Snoozing does not
		// count an attempt, so a send stays queued however long the
		// gateway is away (CONTRACT: it goes out once it can).
		s.waiters.notify(sd.Key, "the gateway is not running")
		return river.JobSnooze(transientRetry)
	case err != nil && (!last || cut()):
		// No answer: the gateway is down, or died mid-send. It may
		// have sent: the retry carries the same key, which a gateway
		// still running answers from memory (only a gateway restart in
		// between sends twice).
		s.waiters.notify(sd.Key, "the gateway did not answer ("+err.Error()+")")
		return fmt.Errorf("gateway.send: %w", err)
	case err != nil:
		return s.finishSend(ctx, sd.Key, Outcome{State: SendFailed, Error: fmt.Sprintf("gave up after %d attempts: %v", job.Attempt, err)}, complete)
	case rep.OK:
		o := Outcome{State: SendSent, WAID: rep.ID}
		if rep.Timestamp != nil {
			o.SentAt = rep.Timestamp.UTC()
		}
		return s.finishSend(ctx, sd.Key, o, complete)
	case isTransient(rep.Error):
		// Nothing was sent (WhatsApp not connected, the gateway
		// stopping): snooze, which counts no attempt, so the send waits
		// for WhatsApp however long it takes instead of failing after
		// the retries run out.
		s.waiters.notify(sd.Key, rep.Error)
		return river.JobSnooze(transientRetry)
	default:
		return s.finishSend(ctx, sd.Key, Outcome{State: SendFailed, Error: rep.Error}, complete)
	}
}

// transientRetry is how soon a send refused for a passing reason is tried
// again: also how long, at most, a queued send waits after WhatsApp is back.
const transientRetry = 15 * time.Second

func isTransient(msg string) bool {
	for _, t := range transientSend {
		if strings.Contains(msg, t) {
			return true
		}
	}
	return false
}

// waitSlot waits for the next SEND_RATE slot on relay's clock.
func (s *Service) waitSlot(ctx context.Context) error {
	now := s.clock.Now()
	r := s.limiter.ReserveN(now, 1)
	d := r.DelayFrom(now)
	if d <= 0 {
		return nil
	}
	t := s.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.Chan():
		return nil
	case <-ctx.Done():
		r.CancelAt(s.clock.Now())
		return ctx.Err()
	}
}

// finishSend records an outcome, completes the job and queues the outcome's
// events, all in one transaction: committed, the send is done for good; not
// committed, the job runs again. The gateway answers that retry from its
// memory of sent keys, but only while it keeps running: so the write is
// retried here for a while first rather than leaning on it.
func (s *Service) finishSend(ctx context.Context, key string, o Outcome, complete InTx) error {
	st, _ := s.backend()
	o.FinishedAt = s.clock.Now().UTC()
	event := "msg.sent"
	if o.State == SendFailed {
		event = "msg.send_failed"
	}
	jobs := s.deliveries(event, DeliveryArgs{Session: s.cfg.Session, Item: ItemSend, Key: key})
	hook := func(ctx context.Context, tx Tx) error {
		if err := complete(ctx, tx); err != nil {
			return err
		}
		return tx.InsertJobs(ctx, jobs)
	}
	// About 20 s in 8 tries, 200 ms doubling to 5 s; plain steps: the
	// database is relay's own, and tests drive the clock step by step.
	retry := backoff.Backoff{Min: 200 * time.Millisecond, Max: 5 * time.Second}
	var err error
	for attempt := 1; attempt <= 8; attempt++ {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
		_, err = st.FinishSend(wctx, s.cfg.Session, key, o, hook)
		cancel()
		s.dbResult(err)
		if err == nil {
			s.waiters.notify(key, "")
			if o.State == SendFailed {
				s.log.Warn("send failed", "idempotency_key", key, "err", o.Error)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("record send outcome: %w", err)
		case <-s.clock.After(retry.Step(attempt)):
		}
	}
	return fmt.Errorf("record send outcome: %w", err)
}

// waiters are P.msg.send requests waiting for their send, by key.
type waiters struct {
	mu sync.Mutex
	m  map[string][]*waiter
}

// waiter is one waiting request: ch closes at news of its send; deferred is
// the gateway's refusal when the news is a transient one (the send stays
// queued), empty for an outcome.
type waiter struct {
	ch       chan struct{}
	deferred string
}

// add registers a waiter; stop removes it. The returned func reads the
// deferral reason once the channel has closed.
func (w *waiters) add(key string) (<-chan struct{}, func() string, func()) {
	wt := &waiter{ch: make(chan struct{})}
	w.mu.Lock()
	w.m[key] = append(w.m[key], wt)
	w.mu.Unlock()
	reason := func() string {
		w.mu.Lock()
		defer w.mu.Unlock()
		return wt.deferred
	}
	return wt.ch, reason, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		list := w.m[key]
		for i, c := range list {
			if c == wt {
				list = append(list[:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(w.m, key)
		} else {
			w.m[key] = list
		}
	}
}

// notify wakes every waiter of key: its send has an outcome, or (deferred
// not empty) its attempt was refused for a reason that passes and the send
// stays queued.
func (w *waiters) notify(key, deferred string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.m[key] {
		c.deferred = deferred
		close(c.ch)
	}
	delete(w.m, key)
}
