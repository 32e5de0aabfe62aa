package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// botOutage is how long the bot of the catch-up tests stays away. The
// issue says a minute; nothing in relay or the stream measures the
// outage (the stream keeps MESSAGE_RETENTION, replay reads the database),
// so a few seconds pin the same behaviour.
const botOutage = 5 * time.Second

// botConn connects as a bot holding NATS_TOKEN.
func botConn(t *testing.T, e env, name string) *nats.Conn {
	t.Helper()
	nc, err := bus.Connect("nats://"+e["NATS_LISTEN"], e["NATS_TOKEN"], name, logging.Discard())
	if err != nil {
		t.Fatalf("connect as a bot: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// storedUpTo waits until relay has stored seq n (replay, asked on w's own
// connection, reaches it).
func storedUpTo(t *testing.T, w *sandboxWatch, n int64) {
	t.Helper()
	waitFor(t, 30*time.Second, "relay to store the messages", func() bool {
		var rep bus.MsgReplayReply
		w.request(w.subj.MsgReplay(), bus.MsgReplayRequest{AfterSeq: n - 1, Limit: 1}, &rep)
		return rep.OK && len(rep.Messages) == 1
	})
}

// checkCaughtUp: the messages a bot got after its outage are exactly the
// ones injected meanwhile, in seq order, the first one right after the last
// seq it had.
func checkCaughtUp(t *testing.T, got []bus.MsgIn, lastSeq int64, missed []string) {
	t.Helper()
	var ids []string
	for i, m := range got {
		ids = append(ids, m.ID)
		if m.Seq != lastSeq+int64(i)+1 {
			t.Errorf("caught-up message %d has seq %d, want %d", i, m.Seq, lastSeq+int64(i)+1)
		}
	}
	if !slices.Equal(ids, missed) {
		t.Errorf("after the outage the bot got %v, want what it missed, %v", ids, missed)
	}
}

// A bot with a durable JetStream pull consumer that goes away and comes
// back resumes at its first unacknowledged message: everything injected
// while it was away, and nothing it had acknowledged.
func TestBotCatchesUpThroughJetStreamAfterAnOutage(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), "").with("NATS_JETSTREAM", "true", "SESSION_ID", "E2E-JetStream")
	p := start(t, bin, "run (jetstream)", e, "run")
	w := watchSandbox(t, e, p)
	w.link()

	stream := relay.StreamName(e["SESSION_ID"])
	consumer := func(nc *nats.Conn) jetstream.Consumer {
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		var c jetstream.Consumer
		waitFor(t, 20*time.Second, "relay's stream and the bot's durable consumer", func() bool {
			c, err = js.CreateOrUpdateConsumer(t.Context(), stream, jetstream.ConsumerConfig{
				Durable: "e2e-bot", FilterSubject: w.subj.MsgIn(), AckPolicy: jetstream.AckExplicitPolicy,
			})
			return err == nil
		})
		return c
	}
	// fetch reads n messages from the consumer, acknowledging each.
	fetch := func(c jetstream.Consumer, n int) []bus.MsgIn {
		var out []bus.MsgIn
		waitFor(t, 30*time.Second, "the consumer's messages", func() bool {
			batch, err := c.Fetch(n-len(out), jetstream.FetchMaxWait(time.Second))
			if err != nil {
				t.Fatalf("fetch: %v", err)
			}
			for m := range batch.Messages() {
				var in bus.MsgIn
				if err := json.Unmarshal(m.Data(), &in); err != nil {
					t.Fatalf("stream message %s: %v", m.Data(), err)
				}
				out = append(out, in)
				if err := m.DoubleAck(t.Context()); err != nil {
					t.Fatalf("ack: %v", err)
				}
			}
			return len(out) >= n
		})
		return out
	}

	nc := botConn(t, e, "e2e-bot")
	c := consumer(nc)
	before := w.inject(bus.SandboxInjectRequest{From: "4915100000010", Text: "before the outage", Count: 3})
	got := fetch(c, len(before))
	checkCaughtUp(t, got, 0, before)
	nc.Close() // the bot goes away

	away := time.Now()
	missed := w.inject(bus.SandboxInjectRequest{From: "4915100000011", Text: "while the bot is away", Count: 5})
	storedUpTo(t, w, int64(len(before)+len(missed)))
	<-time.NewTimer(botOutage - time.Since(away)).C

	c = consumer(botConn(t, e, "e2e-bot (back)"))
	checkCaughtUp(t, fetch(c, len(missed)), got[len(got)-1].Seq, missed)
	// Nothing more: what it acknowledged before does not come again.
	if batch, err := c.Fetch(1, jetstream.FetchMaxWait(time.Second)); err != nil {
		t.Fatal(err)
	} else {
		for m := range batch.Messages() {
			t.Errorf("the consumer has more after catching up: %s", m.Data())
		}
	}
	p.stop(t, 30*time.Second)
}

// Without JetStream a bot that goes away misses P.msg.in; asking
// P.msg.replay after the last seq it had gives it exactly what it missed.
func TestBotCatchesUpThroughReplayAfterAnOutage(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), "").with("SESSION_ID", "E2E-Replay")
	p := start(t, bin, "run (replay)", e, "run")
	w := watchSandbox(t, e, p)
	w.link()

	nc := botConn(t, e, "e2e-bot")
	var mu sync.Mutex
	var live []bus.MsgIn
	if _, err := nc.Subscribe(w.subj.MsgIn(), func(m *nats.Msg) {
		var in bus.MsgIn
		if json.Unmarshal(m.Data, &in) == nil {
			mu.Lock()
			live = append(live, in)
			mu.Unlock()
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	before := w.inject(bus.SandboxInjectRequest{From: "4915100000012", Text: "before the outage", Count: 3})
	waitFor(t, 30*time.Second, "the bot to get the first messages", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(live) >= len(before)
	})
	mu.Lock()
	checkCaughtUp(t, live, 0, before)
	last := live[len(live)-1].Seq
	mu.Unlock()
	nc.Close()

	away := time.Now()
	missed := w.inject(bus.SandboxInjectRequest{From: "4915100000013", Text: "while the bot is away", Count: 5})
	storedUpTo(t, w, last+int64(len(missed)))
	<-time.NewTimer(botOutage - time.Since(away)).C

	back := botConn(t, e, "e2e-bot (back)")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var rep bus.MsgReplayReply
	if err := bus.Request(ctx, back, w.subj.MsgReplay(), bus.MsgReplayRequest{AfterSeq: last}, &rep); err != nil || !rep.OK {
		t.Fatalf("msg.replay after %d: %v %s", last, err, rep.Error)
	}
	checkCaughtUp(t, rep.Messages, last, missed)
	// The command line prints the same.
	out := run(t, bin, e, "messages", "--after", "0")
	if n := strings.Count(strings.TrimSpace(out), "\n") + 1; n != len(before)+len(missed) {
		t.Errorf("blacksky messages --after 0 printed %d lines, want %d:\n%s", n, len(before)+len(missed), out)
	}
	p.stop(t, 30*time.Second)
}

// A send accepted with "wait": false while WhatsApp cannot take it, then
// SIGTERM: after the restart it goes out exactly once.
func TestQueuedSendGoesOutOnceAfterARestart(t *testing.T) {
	t.Parallel()
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), db.URL).with("SESSION_ID", "E2E-Send")
	run(t, bin, e, "migrate")
	p := start(t, bin, "run (send)", e, "run")
	w := watchSandbox(t, e, p)
	w.link()

	// A ban (kept in sandbox.db) answers every login until it expires: the
	// gateway is off WhatsApp from the disconnect on, in this process and
	// for a while in the next, time for the test to listen there before
	// the send can go out.
	w.fault(bus.SandboxFaultRequest{Kind: "temporary_ban", Expire: "20s"})
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	w.next(bus.ConnTemporaryBan)

	key := "order-" + randomHex(t, 6)
	text := "queued before SIGTERM " + key
	noWait := false
	var rep bus.MsgSendReply
	w.request(w.subj.MsgSend(), bus.MsgSend{To: "4915100000020", Text: text, IdempotencyKey: key, Wait: &noWait}, &rep)
	if !rep.OK || !rep.Queued || rep.IdempotencyKey != key {
		t.Fatalf("msg.send wait:false = %+v, want ok, queued, key %s", rep, key)
	}
	// outbox counts the sends of text the sandbox received (asked until
	// the sandbox of a process just started answers).
	outbox := func(w *sandboxWatch) int {
		var ob bus.SandboxOutboxReply
		waitFor(t, 20*time.Second, "sandbox.outbox", func() bool {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			ob = bus.SandboxOutboxReply{}
			return bus.Request(ctx, w.nc, w.subj.SandboxOutbox(), bus.SandboxOutboxRequest{Limit: 1000}, &ob) == nil
		})
		if !ob.OK {
			t.Fatalf("sandbox.outbox: %s", ob.Error)
		}
		n := 0
		for _, m := range ob.Messages {
			if m.Text == text && m.Refused == "" {
				n++
			}
		}
		return n
	}
	if n := outbox(w); n != 0 {
		t.Fatalf("the send went out %d times while the gateway was banned", n)
	}
	p.stop(t, 30*time.Second)

	p2 := start(t, bin, "run (send, restarted)", e, "run")
	w2 := watchSandbox(t, e, p2)
	var mu sync.Mutex
	var outcomes []bus.MsgSendOutcome
	for _, s := range []string{w2.subj.MsgSent(), w2.subj.MsgSendFailed()} {
		if _, err := w2.nc.Subscribe(s, func(m *nats.Msg) {
			var o bus.MsgSendOutcome
			if json.Unmarshal(m.Data, &o) == nil && o.IdempotencyKey == key {
				mu.Lock()
				outcomes = append(outcomes, o)
				mu.Unlock()
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w2.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := outbox(w2); n != 0 {
		t.Fatalf("the send went out before the test listened (%d): the ban did not hold the restarted gateway", n)
	}
	waitFor(t, 90*time.Second, "the queued send to go out after the ban", func() bool { return outbox(w2) > 0 })
	// Asked again with its key (waiting): the first outcome, not a second send.
	var again bus.MsgSendReply
	w2.request(w2.subj.MsgSend(), bus.MsgSend{To: "4915100000020", Text: text, IdempotencyKey: key}, &again)
	waitFor(t, 10*time.Second, "P.msg.sent", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(outcomes) > 0
	})
	mu.Lock()
	got := slices.Clone(outcomes)
	mu.Unlock()
	if len(got) != 1 || got[0].ID == "" || got[0].Error != "" {
		t.Errorf("outcome events for %s: %+v, want one P.msg.sent", key, got)
	}
	if !again.OK || again.ID != got[0].ID {
		t.Errorf("msg.send again with the key = %+v, want ok with the first send's id %s", again, got[0].ID)
	}
	if n := outbox(w2); n != 1 {
		t.Errorf("the sandbox received the send %d times, want once", n)
	}
	sent := on[bus.SandboxSent](w2, w2.subj.SandboxOut())
	if n := len(slices.DeleteFunc(sent, func(s bus.SandboxSent) bool { return s.Text != text })); n != 1 {
		t.Errorf("P.sandbox.out showed the send %d times, want once", n)
	}
	p2.stop(t, 30*time.Second)
	checkLogs(t, []string{e["NATS_TOKEN"], e["HEALTH_TOKEN"], e["SESSION_ENCRYPTION_KEY"]}, p, p2)
}

// readyz returns /readyz's status code and body.
func readyz(t *testing.T, port string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://127.0.0.1:" + port + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// gatewayBeat returns the newest gateway heartbeat's details.
func gatewayBeat(t *testing.T, h *heartbeats) bus.GatewayDetails {
	t.Helper()
	hb, ok := h.get(bus.ServiceGateway)
	var d bus.GatewayDetails
	if ok {
		_ = json.Unmarshal(hb.Details, &d)
	}
	return d
}
