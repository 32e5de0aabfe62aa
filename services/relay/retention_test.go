package relay_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestMessagesOlderThanRetentionArePrunedOnRelaysClock(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			clock := clockwork.NewFakeClockAt(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
			s.clock = clock
			s.cfg.Retention = time.Hour
			s.start(t)
			store(t, s.bus.nc, message("c", "old", "old"))
			clock.Advance(45 * time.Minute)
			store(t, s.bus.nc, message("c", "new", "new"))
			replay := func() []bus.MsgIn {
				var rep bus.MsgReplayReply
				request(t, s.bus.nc, subj.MsgReplay(), []byte(`{}`), &rep)
				return rep.Messages
			}
			// 30 minutes later the first is 75 minutes old, the second 30.
			clock.Advance(30 * time.Minute)
			testwait.Every(t, 20*time.Second, 50*time.Millisecond, "the old message pruned", func() bool {
				clock.Advance(time.Second) // keeps the prune ticker's time moving
				return len(replay()) == 1
			})
			if got := replay(); got[0].ID != "new" || got[0].Seq != 2 {
				t.Fatalf("kept %+v, want the newer message with its seq", got)
			}
			if rep := store(t, s.bus.nc, message("c", "newest", "x")); rep.Seq != 3 {
				t.Fatalf("seq after pruning: %d, want 3 (never reused)", rep.Seq)
			}
		})
	}
}

// A bus delivery still waiting (here for a JetStream stream another stream
// blocks) when MESSAGE_RETENTION deletes its message is dead, saying why
// (not completed as if delivered), and is pruned with its message.
func TestADeliveryOutlivedByItsMessageIsDeadSayingWhyAndPrunedWithIt(t *testing.T) {
	s := jsSetup(t)
	admin, err := jetstream.New(s.bus.nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateStream(context.Background(), jetstream.StreamConfig{Name: "squatter", Subjects: []string{subj.MsgIn()}}); err != nil {
		t.Fatal(err)
	}
	s.cfg.Retention = 3 * time.Second // wall time: River's own times are
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 30*time.Second, "the delivery to die saying why", func() bool {
		return strings.Contains(in.logs.String(), "deleted by MESSAGE_RETENTION before it could be delivered")
	})
	testwait.For(t, 30*time.Second, "the dead delivery pruned with its message", func() bool {
		return s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind LIKE 'blacksky_relay_%' AND state <> 'completed'`) == 0
	})
}

// deliveries retry of a dead delivery whose message MESSAGE_RETENTION has
// deleted does not pretend to send it again: the dead job is deleted and
// not counted.
func TestRetryDeletesADeadDeliveryWhoseMessageIsGone(t *testing.T) {
	rcv := newReceiver(t, 400)
	s := webhookSetup(t, "sqlite", rcv)
	// Relay's clock decides what is pruned; River's jobs carry wall
	// times, which this clock never reaches: the dead job outlives its
	// message, as one retried late would.
	clock := clockwork.NewFakeClockAt(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	s.clock = clock
	s.cfg.Retention = time.Hour
	s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 20*time.Second, "a dead delivery", func() bool { return openStats(t, s).dead == 1 })
	clock.Advance(2 * time.Hour)
	testwait.Every(t, 20*time.Second, 50*time.Millisecond, "the message pruned", func() bool {
		clock.Advance(time.Second)
		var rep bus.MsgReplayReply
		request(t, s.bus.nc, subj.MsgReplay(), []byte(`{}`), &rep)
		return rep.OK && len(rep.Messages) == 0
	})
	var rep bus.RelayRetryReply
	request(t, s.bus.nc, subj.RelayRetry(), []byte(`{}`), &rep)
	if !rep.OK || rep.Retried != 0 {
		t.Fatalf("deliveries retry after the message was pruned: %+v, want nothing retried", rep)
	}
	if st := openStats(t, s); st.dead != 0 || st.pending != 0 {
		t.Fatalf("after the retry: %+v, want the dead delivery deleted", st)
	}
	if n := len(rcv.deliveries()); n != 1 {
		t.Fatalf("the receiver got %d requests, want the one before the prune", n)
	}
}
