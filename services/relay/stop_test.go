package relay_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// A webhook POST still running when relay stops (a receiver that hangs)
// gets StopGrace, is then cancelled, and relay stops cleanly: the delivery
// counts no attempt and no error, and once relay is back it goes first,
// with the same id, before the chat's later messages.
func TestStopCancelsASlowDeliveryAfterTheGraceAndItRunsAgainFirstWithoutAnAttempt(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			rcv := newReceiver(t, 200)
			rcv.sleep[0] = time.Hour // hangs until relay gives up the request
			s := webhookSetup(t, kind, rcv)
			s.cfg.WebhookTimeout = time.Minute
			s.cfg.StopGrace = 200 * time.Millisecond
			in := s.start(t)
			for _, id := range []string{"A", "B", "C"} {
				store(t, s.bus.nc, message("c", id, "x"))
			}
			testwait.For(t, 20*time.Second, "the POST to hang", func() bool { return len(rcv.deliveries()) == 1 })

			began := time.Now()
			in.stop(t) // fails the test if Run returned an error
			if took := time.Since(began); took > 5*time.Second {
				t.Fatalf("relay took %s to stop with a 200ms StopGrace", took.Round(time.Millisecond))
			}
			waiting := s.db.exec(t, `UPDATE river_job SET attempt = attempt
				WHERE kind = 'blacksky_relay_webhook' AND state = 'available' AND attempt = 0 AND errors IS NULL`)
			if waiting != 3 {
				t.Fatalf("%d webhook jobs wait with no attempt and no error after the stop, want 3", waiting)
			}

			s.start(t)
			testwait.For(t, 20*time.Second, "the deliveries after the restart", func() bool { return len(rcv.deliveries()) >= 4 })
			var order []string
			for _, d := range rcv.deliveries() {
				order = append(order, d.header.Get("X-Blacksky-Delivery"))
			}
			if want := []string{"msg.1", "msg.1", "msg.2", "msg.3"}; !slices.Equal(order[:4], want) {
				t.Fatalf("deliveries %v, want %v: the interrupted one again first, then the chat's later ones", order, want)
			}
			testwait.For(t, 20*time.Second, "the deliveries recorded as made", func() bool {
				st := openStats(t, s)
				return st.dead == 0 && st.pending == 0
			})
			if failed := s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind LIKE 'blacksky_relay_%' AND errors IS NOT NULL`); failed != 0 {
				t.Fatalf("%d relay jobs recorded an error: a stop and a start are no failure", failed)
			}
		})
	}
}

// A send waiting for the gateway's answer when relay stops, on its last
// allowed attempt, is not failed by the stop: it stays queued and goes out
// once relay is back.
func TestStopDoesNotFailASendCutShortOnItsLastAttempt(t *testing.T) {
	s := newSetup(t, "postgres")
	s.cfg.GatewayTimeout = time.Minute
	s.cfg.StopGrace = 200 * time.Millisecond
	s.sendMaxAttempts = 1
	asked := make(chan struct{}, 1)
	silent, err := s.bus.nc.Subscribe(subj.GatewaySend(), func(*nats.Msg) { asked <- struct{}{} }) // never answers
	if err != nil {
		t.Fatal(err)
	}
	failed := collect(t, s.bus.nc, subj.MsgSendFailed())
	first := s.start(t)
	bot := s.bus.conn(t, bus.RoleBot)
	if rep := send(t, bot, `{"to":"15551234567","text":"cut","idempotency_key":"cut","wait":false}`); !rep.OK || !rep.Queued {
		t.Fatalf("queued send: %+v", rep)
	}
	testwait.For(t, 20*time.Second, "relay to ask the gateway", func() bool { return len(asked) == 1 })
	first.stop(t)
	if err := silent.Unsubscribe(); err != nil {
		t.Fatal(err)
	}

	gw := startGateway(t, s.bus.nc)
	sent := collect(t, s.bus.nc, subj.MsgSent())
	s.start(t)
	testwait.For(t, 60*time.Second, "the send after the restart", func() bool { return sent.len() >= 1 })
	if n := gw.count("cut"); n != 1 {
		t.Fatalf("the gateway was asked %d times after the restart, want once", n)
	}
	if n := failed.len(); n != 0 {
		t.Fatalf("%d send_failed events: the stop failed the send", n)
	}
}

// startsFailing is a store whose River client fails to start the first
// `fails` times, as when the database drops between the store's opening
// and River's start.
type startsFailing struct {
	relay.Store
	fails *atomic.Int32
}

func (s startsFailing) NewQueue(cfg relay.QueueConfig) (relay.Queue, error) {
	q, err := s.Store.NewQueue(cfg)
	return failingQueue{Queue: q, fails: s.fails}, err
}

type failingQueue struct {
	relay.Queue
	fails *atomic.Int32
}

func (q failingQueue) Start(ctx context.Context) error {
	if q.fails.Add(-1) >= 0 {
		return errors.New("start river: unexpected EOF")
	}
	return q.Queue.Start(ctx)
}

// A job queue that fails to start is started again, with a new store, and
// what relay stored meanwhile is delivered once it runs.
func TestStartOfTheJobQueueIsRetriedWhileItFails(t *testing.T) {
	s := newSetup(t, "postgres")
	fails := &atomic.Int32{}
	fails.Store(2)
	s.open = func(ctx context.Context) (relay.Store, error) {
		st, err := s.db.open(ctx)
		if err != nil {
			return nil, err
		}
		return startsFailing{Store: st, fails: fails}, nil
	}
	msgIn := collect(t, s.bus.nc, subj.MsgIn())
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 30*time.Second, "the message on the bus", func() bool { return msgIn.len() == 1 })
	if got := strings.Count(in.logs.String(), "cannot start the job queue; retrying"); got != 2 {
		t.Fatalf("%d lines say the start is retried, want 2:\n%s", got, in.logs.String())
	}
}
