package relay_test

import (
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

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

// A delivery still retrying when MESSAGE_RETENTION deletes its message is
// dead, saying why (not completed as if delivered), and dead deliveries go
// with their messages: nothing is left for deliveries retry to pretend to
// send again.
func TestADeliveryOutlivedByItsMessageIsDeadSayingWhyAndPrunedWithIt(t *testing.T) {
	rcv := newReceiver(t, 503)
	s := webhookSetup(t, "postgres", rcv)
	s.cfg.Retention = 3 * time.Second // wall time: River's own times are
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 30*time.Second, "the delivery to die saying why", func() bool {
		return strings.Contains(in.logs.String(), "deleted by MESSAGE_RETENTION before it could be delivered")
	})
	testwait.For(t, 30*time.Second, "the dead delivery pruned with its message", func() bool {
		st := openStats(t, s)
		return st.dead == 0 && st.pending == 0
	})
	var rep bus.RelayRetryReply
	request(t, s.bus.nc, subj.RelayRetry(), []byte(`{}`), &rep)
	if !rep.OK || rep.Retried != 0 {
		t.Fatalf("deliveries retry after the prune: %+v, want nothing retried", rep)
	}
}
