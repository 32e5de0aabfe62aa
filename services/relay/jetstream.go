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
// MESSAGE_RETENTION). Without JetStream relay publishes with core NATS;
// the answer is read once, at start.
func (s *Service) setupJetStream(ctx context.Context) {
	js, err := jetstream.New(s.opts.NC)
	if err != nil {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(cctx); err != nil {
		if !errors.Is(err, jetstream.ErrJetStreamNotEnabled) && !errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) &&
			!errors.Is(err, nats.ErrNoResponders) {
			s.log.Warn("jetstream: cannot tell whether the server has it; publishing with core NATS", "err", err)
		}
		return
	}
	name := StreamName(s.cfg.Session)
	_, err = js.CreateOrUpdateStream(cctx, jetstream.StreamConfig{
		Name:        name,
		Description: "BLACKSKY-MD relay: incoming messages, receipts and send outcomes of session " + s.cfg.Session,
		Subjects:    StreamSubjects(s.subj),
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      s.cfg.Retention,
		Duplicates:  StreamDuplicates,
	})
	if err != nil {
		s.noteErr(err)
		s.log.Error("jetstream: cannot create the session's stream; publishing with core NATS", "stream", name, "err", err)
		return
	}
	s.mu.Lock()
	s.js = js
	s.mu.Unlock()
	s.log.Info("jetstream: publishing into the session's stream", "stream", name)
}

func jsMsg(r rendered) *nats.Msg {
	m := nats.NewMsg(r.subject)
	m.Data = r.body
	m.Header.Set(jetstream.MsgIDHeader, r.id)
	return m
}
