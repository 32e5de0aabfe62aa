// Package sandboxbus puts the WhatsApp sandbox's control surface on the bus:
// P.sandbox.link, P.sandbox.inject, P.sandbox.fault, P.sandbox.receipt and
// P.sandbox.outbox are answered (ok:false with the reason for bad input),
// and every message the bot sends is published on P.sandbox.out. The
// sandbox itself knows nothing of NATS.
package sandboxbus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// RequestTimeout bounds the work of one request (a large inject is one
// transaction).
const RequestTimeout = time.Minute

// Service serves one session's sandbox subjects. Run it once.
type Service struct {
	NC      *nats.Conn
	Server  *sandbox.Server
	Session string
	Clock   clockwork.Clock // nil: real clock
	Log     *slog.Logger
}

// Run serves until ctx ends, then waits for the requests under way.
func (s *Service) Run(ctx context.Context) error {
	if s.Clock == nil {
		s.Clock = clockwork.NewRealClock()
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	subj := bus.NewSubjects(s.Session)
	s.Server.OnSent(func(m sandbox.Sent) {
		out := bus.SandboxSent{ID: m.ID, To: m.To, Text: m.Text, Timestamp: m.Timestamp, Refused: m.Refused}
		out.Stamp(s.Session, s.Clock.Now())
		if err := bus.Publish(s.NC, subj.SandboxOut(), out); err != nil {
			s.Log.Warn("publish sandbox.out", "err", err)
		}
	})
	defer s.Server.OnSent(nil)
	handlers := map[string]func(context.Context, []byte) any{
		subj.SandboxLink():    s.link,
		subj.SandboxInject():  s.inject,
		subj.SandboxFault():   s.fault,
		subj.SandboxReceipt(): s.receipt,
		subj.SandboxOutbox():  s.outbox,
	}
	// Handlers run on nats.go's goroutines: Run owns them through inflight
	// and returns only after the last one finished, so whoever closes the
	// server file after Run never closes it under a request (a large
	// inject is one transaction). A request that arrives once Run is
	// ending is refused.
	var (
		mu       sync.Mutex
		ending   bool
		inflight sync.WaitGroup
		subs     []*nats.Subscription
	)
	defer func() {
		for _, sub := range subs {
			_ = sub.Unsubscribe()
		}
		mu.Lock()
		ending = true
		mu.Unlock()
		inflight.Wait()
	}()
	for subject, h := range handlers {
		sub, err := s.NC.Subscribe(subject, func(m *nats.Msg) {
			mu.Lock()
			if ending {
				mu.Unlock()
				_ = bus.Respond(m, bus.SandboxFaultReply{Error: "sandbox: shutting down"})
				return
			}
			inflight.Add(1)
			mu.Unlock()
			defer inflight.Done()
			// A request under way finishes (bounded), even when Run is
			// told to end: its answer says what was done.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), RequestTimeout)
			defer cancel()
			switch err := bus.Respond(m, h(rctx, m.Data)); {
			case errors.Is(err, bus.ErrReplySubject):
				s.Log.Debug("sandbox request not answered", "subject", subject, "err", err)
			case err != nil:
				s.Log.Warn("answer sandbox request", "subject", subject, "err", err)
			}
		})
		if err != nil {
			return fmt.Errorf("sandboxbus: subscribe %s: %w", subject, err)
		}
		subs = append(subs, sub)
	}
	// Not the seed: the sandbox device's keys derive from it.
	s.Log.Info("sandbox control on the bus", "subjects", subj.Prefix+".sandbox.*")
	<-ctx.Done()
	return nil
}

func (s *Service) link(ctx context.Context, data []byte) any {
	req, err := bus.DecodeSandboxLink(data)
	if err != nil {
		return bus.SandboxLinkReply{Error: err.Error()}
	}
	jid, err := s.Server.Link(ctx, req.Phone)
	if err != nil {
		return bus.SandboxLinkReply{Error: err.Error()}
	}
	return bus.SandboxLinkReply{OK: true, JID: jid.String()}
}

func (s *Service) inject(ctx context.Context, data []byte) any {
	req, err := bus.DecodeSandboxInject(data)
	if err != nil {
		return bus.SandboxInjectReply{Error: err.Error()}
	}
	in := sandbox.Inject{
		From: req.From, PushName: req.PushName, Group: req.Group, Type: req.Type,
		Content: sandbox.Content{Text: req.Text, FileName: req.FileName, Target: req.Target, Options: req.Options},
		Count:   req.Count, Rate: req.Rate,
	}
	if req.Latitude != nil && req.Longitude != nil {
		in.HasLocation, in.Latitude, in.Longitude = true, *req.Latitude, *req.Longitude
	}
	ids, err := s.Server.Inject(ctx, in)
	if err != nil {
		return bus.SandboxInjectReply{Error: err.Error()}
	}
	rep := bus.SandboxInjectReply{OK: true, Count: len(ids), IDs: ids}
	if len(ids) > bus.MaxSandboxIDs {
		rep.IDs = ids[:bus.MaxSandboxIDs]
	}
	return rep
}

func (s *Service) fault(ctx context.Context, data []byte) any {
	req, err := bus.DecodeSandboxFault(data)
	if err != nil {
		return bus.SandboxFaultReply{Error: err.Error()}
	}
	f := sandbox.Fault{Kind: req.Kind, Code: req.Code, Message: req.Message, Count: req.Count}
	for _, d := range []struct {
		name string
		in   string
		out  *time.Duration
	}{{"expire", req.Expire, &f.Expire}, {"duration", req.Duration, &f.Duration}} {
		if d.in == "" {
			continue
		}
		v, err := time.ParseDuration(d.in)
		if err != nil || v < 0 {
			return bus.SandboxFaultReply{Error: fmt.Sprintf("%s: want a duration such as 30s or 1h, got %q", d.name, d.in)}
		}
		*d.out = v
	}
	if err := s.Server.Fault(ctx, f); err != nil {
		return bus.SandboxFaultReply{Error: err.Error()}
	}
	return bus.SandboxFaultReply{OK: true}
}

func (s *Service) receipt(ctx context.Context, data []byte) any {
	req, err := bus.DecodeSandboxReceipt(data)
	if err != nil {
		return bus.SandboxReceiptReply{Error: err.Error()}
	}
	q, err := s.Server.Receipt(ctx, sandbox.ReceiptRequest{IDs: req.IDs, Type: req.Type})
	if err != nil {
		return bus.SandboxReceiptReply{Error: err.Error()}
	}
	return bus.SandboxReceiptReply{OK: true, Chat: q.Chat.String(), Timestamp: &q.Timestamp}
}

func (s *Service) outbox(ctx context.Context, data []byte) any {
	req, err := bus.DecodeSandboxOutbox(data)
	if err != nil {
		return bus.SandboxOutboxReply{Error: err.Error()}
	}
	sent, err := s.Server.Outbox(ctx, req.Limit)
	if err != nil {
		return bus.SandboxOutboxReply{Error: err.Error()}
	}
	rep := bus.SandboxOutboxReply{OK: true, Messages: make([]bus.SandboxSent, len(sent))}
	for i, m := range sent {
		rep.Messages[i] = bus.SandboxSent{ID: m.ID, To: m.To, Text: m.Text, Timestamp: m.Timestamp, Refused: m.Refused}
		rep.Messages[i].Stamp(s.Session, s.Clock.Now())
	}
	return rep
}
