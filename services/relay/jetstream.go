package relay

import (
	"context"
	"errors"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// StreamName is the JetStream stream of a session: "blacksky_" and the
// session's subject token (stream names allow neither '.' nor wildcards;
// the token has neither).
func StreamName(session string) string {
	return "blacksky_" + bus.SessionToken(session)
}

// StreamSubjects are the subjects the session's stream keeps.
func StreamSubjects(s bus.Subjects) []string {
	return []string{s.MsgIn(), s.MsgReceipt(), s.MsgSent(), s.MsgSendFailed()}
}

// StreamDuplicates is the stream's duplicate window: a delivery repeated
// within it (a retry after a lost ack) is stored once. The repeat that
// matters most comes after a crash: a job that published but died before
// River recorded it runs again only once River's rescuer takes it back
// (jobs.RescueAfter, 3 minutes) plus its retry backoff, so the window is
// several times that. The server keeps one id per message for the window:
// at relay's rates (hundreds a second at most) that is a few MB.
const StreamDuplicates = 10 * time.Minute

// setupJetStream finds out whether the server has JetStream and, if so,
// creates or updates the session's stream (file storage, kept for
// MESSAGE_RETENTION). A server without JetStream is known for good: relay
// publishes with core NATS. One that does not answer, or refuses the
// stream, leaves the question open: bus deliveries then wait and retry
// (jetStreamFor) rather than go out on core NATS, where a bot's durable
// consumer would never see them.
func (s *Service) setupJetStream(ctx context.Context) {
	s.mu.Lock()
	s.jsTried = s.clock.Now()
	s.mu.Unlock()
	js, known := s.askJetStream(ctx)
	s.mu.Lock()
	s.js, s.jsKnown = js, known
	s.mu.Unlock()
}

func (s *Service) askJetStream(ctx context.Context) (jetstream.JetStream, bool) {
	js, err := jetstream.New(s.opts.NC)
	if err != nil {
		s.noteErr(err)
		s.log.Warn("jetstream: cannot ask the server; bus deliveries wait", "err", err)
		return nil, false
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(cctx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) ||
			errors.Is(err, nats.ErrNoResponders) {
			return nil, true
		}
		s.noteErr(err)
		s.log.Warn("jetstream: cannot tell whether the server has it; bus deliveries wait until it answers", "err", err)
		return nil, false
	}
	name := StreamName(s.cfg.Session)
	_, err = js.CreateOrUpdateStream(cctx, jetstream.StreamConfig{
		Name:        name,
		Description: "BLACKSKY-MD relay: incoming messages, receipts and send outcomes of session " + s.cfg.Session,
		Subjects:    StreamSubjects(s.subj),
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      s.cfg.Retention,
		// The server refuses a window longer than the stream keeps
		// messages (a MESSAGE_RETENTION under ten minutes).
		Duplicates: min(StreamDuplicates, s.cfg.Retention),
	})
	if err != nil {
		s.noteErr(err)
		s.log.Error("jetstream: cannot create the session's stream; bus deliveries wait until it can", "stream", name, "err", err)
		return nil, false
	}
	s.log.Info("jetstream: publishing into the session's stream", "stream", name)
	return js, true
}

// jsRetry is how often a delivery asks again while the server's answer
// about JetStream is unknown; the others meanwhile retry without asking.
const jsRetry = 5 * time.Second

// jetStreamFor is the JetStream to publish with (nil: core NATS), or an
// error while that is not known, which retries the delivery.
func (s *Service) jetStreamFor(ctx context.Context) (jetstream.JetStream, error) {
	s.mu.Lock()
	js, known := s.js, s.jsKnown
	ask := !known && s.clock.Since(s.jsTried) >= jsRetry
	if ask {
		s.jsTried = s.clock.Now() // one lane asks; the others retry meanwhile
	}
	s.mu.Unlock()
	if known {
		return js, nil
	}
	if ask {
		if js, known = s.askJetStream(ctx); known {
			s.mu.Lock()
			s.js, s.jsKnown = js, true
			s.mu.Unlock()
			return js, nil
		}
	}
	return nil, errors.New("jetstream: not known yet whether the server has it (see the log); the delivery waits")
}

func jsMsg(r rendered) *nats.Msg {
	m := nats.NewMsg(r.subject)
	m.Data = r.body
	m.Header.Set(jetstream.MsgIDHeader, r.id)
	return m
}
