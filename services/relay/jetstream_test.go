package relay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/jobs"
)

func jsSetup(t *testing.T) *setup {
	s := newSetup(t, "postgres")
	s.bus = newBus(t, bus.ServerOptions{Token: "bots-token-for-relay-tests", JetStream: true, JetStreamDir: t.TempDir()})
	return s
}

// fetch pulls up to n messages from the bot's durable consumer and acks
// them.
func fetch(t *testing.T, cons jetstream.Consumer, n int) []bus.MsgIn {
	t.Helper()
	var out []bus.MsgIn
	testwait.Every(t, 30*time.Second, 50*time.Millisecond, fmt.Sprintf("%d messages from the consumer", n), func() bool {
		batch, err := cons.Fetch(n-len(out), jetstream.FetchMaxWait(500*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		for m := range batch.Messages() {
			var in bus.MsgIn
			if err := json.Unmarshal(m.Data(), &in); err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("msg.%d", in.Seq); m.Headers().Get(jetstream.MsgIDHeader) != want {
				t.Fatalf("Nats-Msg-Id %q, want %q", m.Headers().Get(jetstream.MsgIDHeader), want)
			}
			if err := m.Ack(); err != nil {
				t.Fatal(err)
			}
			out = append(out, in)
		}
		return len(out) >= n
	})
	return out
}

func TestJetStreamDurableConsumerGetsWhatWasPublishedWhileAway(t *testing.T) {
	s := jsSetup(t)
	s.start(t)
	ctx := context.Background()
	stream := relay.StreamName(session)

	bot := s.bus.conn(t, bus.RoleBot)
	js, err := jetstream.New(bot)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{Durable: "my-bot", FilterSubject: subj.MsgIn(),
		AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatalf("a bot creates its durable consumer: %v", err)
	}
	store(t, s.bus.nc, message("c", "A", "before"))
	if got := fetch(t, cons, 1); got[0].Seq != 1 || got[0].Text != "before" {
		t.Fatalf("first: %+v", got)
	}
	bot.Close() // the bot goes away

	for i := range 3 {
		store(t, s.bus.nc, message("c", fmt.Sprintf("W%d", i), fmt.Sprintf("while away %d", i)))
	}
	// Wait until relay has published them into the stream.
	testwait.For(t, 30*time.Second, "the stream to hold four messages", func() bool {
		st, err := jetstream.New(s.bus.nc)
		if err != nil {
			return false
		}
		str, err := st.Stream(ctx, stream)
		if err != nil {
			return false
		}
		info, err := str.Info(ctx)
		return err == nil && info.State.Msgs == 4
	})

	back := s.bus.conn(t, bus.RoleBot)
	js2, err := jetstream.New(back)
	if err != nil {
		t.Fatal(err)
	}
	cons2, err := js2.Consumer(ctx, stream, "my-bot")
	if err != nil {
		t.Fatalf("the bot finds its durable consumer again: %v", err)
	}
	got := fetch(t, cons2, 3)
	for i, m := range got {
		if m.Seq != int64(i+2) || m.Text != fmt.Sprintf("while away %d", i) {
			t.Fatalf("after coming back, message %d: %+v", i, m)
		}
	}

	// Least privilege: the bots' credential cannot touch the stream itself.
	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := js2.DeleteStream(short, stream); err == nil {
		t.Fatal("a bot deleted the stream")
	}
	short2, cancel2 := context.WithTimeout(ctx, time.Second)
	defer cancel2()
	if _, err := js2.CreateStream(short2, jetstream.StreamConfig{Name: "BOTS_OWN", Subjects: []string{"x.>"}}); err == nil {
		t.Fatal("a bot created a stream")
	}
}

func TestJetStreamKeepsARepeatedDeliveryOnce(t *testing.T) {
	s := jsSetup(t)
	s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	ctx := context.Background()
	js, err := jetstream.New(s.bus.nc)
	if err != nil {
		t.Fatal(err)
	}
	var str jetstream.Stream
	testwait.For(t, 30*time.Second, "the message in the stream", func() bool {
		str, err = js.Stream(ctx, relay.StreamName(session))
		if err != nil {
			return false
		}
		info, err := str.Info(ctx)
		return err == nil && info.State.Msgs == 1
	})
	// A delivery job that ran again (its completion lost in a crash)
	// publishes the same Nats-Msg-Id: the stream keeps one.
	m, err := str.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := js.PublishMsg(ctx, natsMsg{subject: m.Subject, data: m.Data, id: m.Header.Get(jetstream.MsgIDHeader)}.msg())
	if err != nil || !ack.Duplicate {
		t.Fatalf("republish: %+v %v, want a duplicate", ack, err)
	}
}

// A delivery whose worker died mid-job runs again only once River's rescuer
// takes it back (jobs.RescueAfter), plus its backoff: the stream's duplicate
// window must still remember the first publish by then.
func TestJetStreamDuplicateWindowOutlastsCrashRecovery(t *testing.T) {
	s := jsSetup(t)
	s.start(t)
	ctx := context.Background()
	js, err := jetstream.New(s.bus.nc)
	if err != nil {
		t.Fatal(err)
	}
	str, err := js.Stream(ctx, relay.StreamName(session))
	if err != nil {
		t.Fatal(err)
	}
	info, err := str.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if w := info.Config.Duplicates; w < 3*jobs.RescueAfter {
		t.Fatalf("duplicate window %s, want well over the rescue delay %s", w, jobs.RescueAfter)
	}
}

type natsMsg struct {
	subject string
	data    []byte
	id      string
}

func (n natsMsg) msg() *nats.Msg {
	m := nats.NewMsg(n.subject)
	m.Data = n.data
	m.Header.Set(jetstream.MsgIDHeader, n.id)
	return m
}

// A MESSAGE_RETENTION shorter than the ten-minute duplicate window still
// gets its stream (the server refuses a window longer than the stream's
// age): the window shrinks to the retention, and messages go into it.
func TestShortRetentionStillPublishesIntoTheStream(t *testing.T) {
	s := jsSetup(t)
	s.cfg.Retention = 5 * time.Minute
	s.start(t)
	store(t, s.bus.nc, message("c", "A", "kept five minutes"))
	js, err := jetstream.New(s.bus.nc)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 30*time.Second, "the message in the stream", func() bool {
		st, err := js.Stream(context.Background(), relay.StreamName(session))
		if err != nil {
			return false
		}
		info, err := st.Info(context.Background())
		return err == nil && info.State.Msgs == 1
	})
	st, err := js.Stream(context.Background(), relay.StreamName(session))
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.MaxAge != 5*time.Minute || info.Config.Duplicates != 5*time.Minute {
		t.Fatalf("stream max age %s, duplicate window %s; want both 5m", info.Config.MaxAge, info.Config.Duplicates)
	}
}

// While the server has JetStream but will not take the session's stream
// (here another stream holds its subjects), bus deliveries wait and retry
// instead of going out on core NATS, where a bot's durable consumer would
// never see them; once the stream can be made they go into it.
func TestDeliveriesWaitWhileTheStreamCannotBeMade(t *testing.T) {
	s := jsSetup(t)
	ctx := context.Background()
	admin, err := jetstream.New(s.bus.nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateStream(ctx, jetstream.StreamConfig{Name: "squatter", Subjects: []string{subj.MsgIn()}}); err != nil {
		t.Fatal(err)
	}
	core := collect(t, s.bus.nc, subj.MsgIn())
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "waits for the stream"))
	testwait.For(t, 30*time.Second, "a bus delivery to fail and retry", func() bool {
		return s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind = 'blacksky_relay_nats' AND errors IS NOT NULL`) == 1
	})
	if !strings.Contains(in.logs.String(), "cannot create the session's stream") {
		t.Fatalf("no line says why:\n%s", in.logs.String())
	}
	if n := core.len(); n != 0 {
		t.Fatalf("%d messages went out on core NATS while the stream could not be made", n)
	}
	if err := admin.DeleteStream(ctx, "squatter"); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 60*time.Second, "the message in the session's stream", func() bool {
		st, err := admin.Stream(ctx, relay.StreamName(session))
		if err != nil {
			return false
		}
		info, err := st.Info(ctx)
		return err == nil && info.State.Msgs == 1
	})
}
