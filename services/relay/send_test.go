package relay_test

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/time/rate"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// fakeGateway answers P.gateway.send as the gateway would, counting the
// requests per idempotency key.
type fakeGateway struct {
	mu     sync.Mutex
	calls  map[string]int
	refuse string // non-empty: answer ok:false with it
	sub    *nats.Subscription
}

func startGateway(t testing.TB, nc *nats.Conn) *fakeGateway {
	t.Helper()
	g := &fakeGateway{calls: map[string]int{}}
	sub, err := nc.Subscribe(subj.GatewaySend(), func(m *nats.Msg) {
		var req bus.MsgSend
		if err := json.Unmarshal(m.Data, &req); err != nil {
			t.Errorf("gateway.send body: %v", err)
			return
		}
		g.mu.Lock()
		g.calls[req.IdempotencyKey]++
		refuse := g.refuse
		g.mu.Unlock()
		rep := bus.MsgSendReply{OK: true, ID: "3EB0" + strings.ToUpper(req.IdempotencyKey)}
		ts := time.Date(2026, 3, 1, 12, 0, 1, 0, time.UTC)
		rep.Timestamp = &ts
		if refuse != "" {
			rep = bus.MsgSendReply{Error: refuse}
		}
		data, _ := json.Marshal(rep)
		_ = m.Respond(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	g.sub = sub
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return g
}

func (g *fakeGateway) count(key string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls[key]
}

func send(t testing.TB, nc *nats.Conn, body string) bus.MsgSendReply {
	t.Helper()
	var rep bus.MsgSendReply
	request(t, nc, subj.MsgSend(), []byte(body), &rep)
	return rep
}

func TestSendWaitsForItsOutcomeAndARepeatedKeyNeverSendsTwice(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			sent := collect(t, s.bus.nc, subj.MsgSent())
			s.start(t)
			gw := startGateway(t, s.bus.nc)
			bot := s.bus.conn(t, bus.RoleBot)
			body := `{"to":"15551234567","text":"hi","idempotency_key":"k1"}`
			rep := send(t, bot, body)
			if !rep.OK || rep.ID != "3EB0K1" || rep.Timestamp == nil || rep.Queued || rep.IdempotencyKey != "k1" {
				t.Fatalf("send: %+v", rep)
			}
			again := send(t, bot, body)
			if !again.OK || again.ID != rep.ID || !again.Timestamp.Equal(*rep.Timestamp) {
				t.Fatalf("repeat: %+v, want the first outcome", again)
			}
			if n := gw.count("k1"); n != 1 {
				t.Fatalf("the gateway was asked %d times, want once", n)
			}
			testwait.For(t, 20*time.Second, "P.msg.sent", func() bool { return sent.len() >= 1 })
			var ev bus.MsgSendOutcome
			if err := json.Unmarshal(sent.all()[0].Data, &ev); err != nil || ev.IdempotencyKey != "k1" || ev.ID != "3EB0K1" ||
				ev.To != "15551234567" || ev.Session != session || ev.At.IsZero() {
				t.Fatalf("msg.sent: %+v %v", ev, err)
			}
			noKey := send(t, bot, `{"to":"15551234567","text":"no key"}`)
			if !noKey.OK || !strings.HasPrefix(noKey.IdempotencyKey, "auto-") {
				t.Fatalf("send without a key: %+v (relay draws one)", noKey)
			}
		})
	}
}

func TestQueuedSendGoesOutOnceAfterARestart(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			first := s.start(t)
			bot := s.bus.conn(t, bus.RoleBot)
			// No gateway answers: the send stays queued.
			rep := send(t, bot, `{"to":"15551234567","text":"later","idempotency_key":"survivor","wait":false}`)
			if !rep.OK || !rep.Queued || rep.IdempotencyKey != "survivor" {
				t.Fatalf("queued send: %+v", rep)
			}
			first.stop(t)
			gw := startGateway(t, s.bus.nc)
			sent := collect(t, s.bus.nc, subj.MsgSent())
			s.start(t)
			testwait.For(t, 60*time.Second, "the send after the restart", func() bool { return sent.len() >= 1 })
			if n := gw.count("survivor"); n != 1 {
				t.Fatalf("the gateway was asked %d times, want once", n)
			}
			again := send(t, bot, `{"to":"15551234567","text":"later","idempotency_key":"survivor","wait":false}`)
			if !again.OK || again.Queued || again.ID != "3EB0SURVIVOR" {
				t.Fatalf("repeat after the send: %+v, want its outcome", again)
			}
		})
	}
}

func TestRefusedSendFailsForGoodWithTheReason(t *testing.T) {
	s := newSetup(t, "sqlite")
	failed := collect(t, s.bus.nc, subj.MsgSendFailed())
	s.start(t)
	gw := startGateway(t, s.bus.nc)
	gw.refuse = "15550000000 is not on WhatsApp"
	bot := s.bus.conn(t, bus.RoleBot)
	rep := send(t, bot, `{"to":"15550000000","text":"x","idempotency_key":"bad"}`)
	if rep.OK || !strings.Contains(rep.Error, "not on WhatsApp") {
		t.Fatalf("refused send: %+v", rep)
	}
	testwait.For(t, 20*time.Second, "P.msg.send_failed", func() bool { return failed.len() >= 1 })
	var ev bus.MsgSendOutcome
	if err := json.Unmarshal(failed.all()[0].Data, &ev); err != nil || ev.IdempotencyKey != "bad" || !strings.Contains(ev.Error, "not on WhatsApp") {
		t.Fatalf("send_failed: %+v %v", ev, err)
	}
	if again := send(t, bot, `{"to":"15550000000","text":"x","idempotency_key":"bad"}`); again.OK || gw.count("bad") != 1 {
		t.Fatalf("repeat of a failed send: %+v, gateway asked %d times", again, gw.count("bad"))
	}
	for body, want := range map[string]string{
		`{"to":"1","text":""}`:                          `"text"`,
		`{"to":"1","text":"x","idempotency_key":"a b"}`: "idempotency_key",
		`{"to":"1","text":"x","wait":"yes"}`:            "bad JSON",
	} {
		if rep := send(t, bot, body); rep.OK || !strings.Contains(rep.Error, want) {
			t.Errorf("%s: %+v, want ok:false naming %s", body, rep, want)
		}
	}
}

// A waiting send answers as soon as the gateway says WhatsApp is not
// connected, as the gateway did before sends were queued, and the send
// stays queued and goes out once the gateway can send it.
func TestWaitingSendAnswersAtOnceWhileWhatsAppIsDownAndStaysQueued(t *testing.T) {
	s := newSetup(t, "sqlite")
	// One attempt only: refusals that say nothing was sent must not use
	// attempts up, or a send would fail for good while WhatsApp is away.
	s.sendMaxAttempts = 1
	sent := collect(t, s.bus.nc, subj.MsgSent())
	s.start(t)
	gw := startGateway(t, s.bus.nc)
	gw.mu.Lock()
	gw.refuse = "not connected to WhatsApp (state: pairing)"
	gw.mu.Unlock()
	bot := s.bus.conn(t, bus.RoleBot)
	rep := send(t, bot, `{"to":"15551234567","text":"hi","idempotency_key":"down"}`)
	if rep.OK || !rep.Queued || rep.IdempotencyKey != "down" || !strings.Contains(rep.Error, "not connected") {
		t.Fatalf("send while WhatsApp is down: %+v, want ok:false, queued, the reason", rep)
	}
	gw.mu.Lock()
	gw.refuse = ""
	gw.mu.Unlock()
	testwait.For(t, 60*time.Second, "the queued send goes out", func() bool { return sent.len() >= 1 })
	again := send(t, bot, `{"to":"15551234567","text":"hi","idempotency_key":"down"}`)
	if !again.OK || again.ID != "3EB0DOWN" || sent.len() != 1 {
		t.Fatalf("after the gateway connected: %+v, %d msg.sent", again, sent.len())
	}
}

// A send whose last attempt runs out of time waiting for its SEND_RATE
// slot fails for good with the reason: it is not left queued with no job
// to send it, and a waiting bot hears it.
func TestSendThatGetsNoRateSlotOnItsLastAttemptFailsWithTheReason(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.cfg.SendRate = rate.Every(time.Hour)
	s.sendTimeout = 300 * time.Millisecond
	s.sendMaxAttempts = 1
	failed := collect(t, s.bus.nc, subj.MsgSendFailed())
	s.start(t)
	startGateway(t, s.bus.nc)
	bot := s.bus.conn(t, bus.RoleBot)
	if rep := send(t, bot, `{"to":"15551234567","text":"first","idempotency_key":"first"}`); !rep.OK {
		t.Fatalf("first send: %+v", rep)
	}
	// The next slot is an hour away; the attempt has 300 ms.
	rep := send(t, bot, `{"to":"15551234567","text":"second","idempotency_key":"second"}`)
	if rep.OK || rep.Queued || !strings.Contains(rep.Error, "SEND_RATE") {
		t.Fatalf("second send: %+v, want ok:false naming SEND_RATE", rep)
	}
	testwait.For(t, 20*time.Second, "P.msg.send_failed", func() bool { return failed.len() >= 1 })
}

// A recipient in no form the gateway can send to is refused when the send
// is asked, not queued to fail later: nothing is stored under its key.
func TestSendToAnUnknownRecipientFormIsRefusedAtOnce(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.start(t)
	gw := startGateway(t, s.bus.nc)
	bot := s.bus.conn(t, bus.RoleBot)
	rep := send(t, bot, `{"to":"abc","text":"x","idempotency_key":"bad-to","wait":false}`)
	if rep.OK || rep.Queued || !strings.Contains(rep.Error, "unknown recipient") {
		t.Fatalf("send to abc: %+v, want ok:false naming the recipient, not queued", rep)
	}
	if gw.count("bad-to") != 0 {
		t.Fatal("the gateway was asked to send to abc")
	}
	// Nothing kept the key: the same key with a good recipient is a new send.
	if ok := send(t, bot, `{"to":"15551234567","text":"x","idempotency_key":"bad-to"}`); !ok.OK || gw.count("bad-to") != 1 {
		t.Fatalf("the key after the refusal: %+v", ok)
	}
}
