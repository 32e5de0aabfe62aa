package relay_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// receiver is a webhook endpoint that answers each request with the next
// status of its script (the last one repeats), after sleeping when told.
type receiver struct {
	mu     sync.Mutex
	script []int
	sleep  map[int]time.Duration // by request number
	got    []delivery
	srv    *httptest.Server
}

type delivery struct {
	header http.Header
	body   []byte
}

func newReceiver(t testing.TB, script ...int) *receiver {
	r := &receiver{script: script, sleep: map[int]time.Duration{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		n := len(r.got)
		r.got = append(r.got, delivery{header: req.Header.Clone(), body: body})
		status := r.script[min(n, len(r.script)-1)]
		sleep := r.sleep[n]
		r.mu.Unlock()
		if sleep > 0 {
			select {
			case <-time.After(sleep):
			case <-req.Context().Done():
				return
			}
		}
		w.WriteHeader(status)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) deliveries() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]delivery(nil), r.got...)
}

func (r *receiver) setScript(script ...int) {
	r.mu.Lock()
	r.script = script
	r.mu.Unlock()
}

// hookURL carries credentials in its userinfo and query: neither may show
// in a log.
func (r *receiver) hookURL() string {
	return strings.Replace(r.srv.URL, "http://", "http://hookuser:hookpass-secret@", 1) + "/hook?token=query-secret"
}

// verify is a receiver's signature check, written from the documentation
// (docs/relay.md), not from relay's code.
func verify(secret string, h http.Header, body []byte) bool {
	ts := h.Get("X-Blacksky-Timestamp")
	if _, err := strconv.ParseInt(ts, 10, 64); err != nil {
		return false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "." + string(body)))
	want := "sha256=" + hex.EncodeToString(mac.Sum(nil))
	return hmac.Equal([]byte(want), []byte(h.Get("X-Blacksky-Signature")))
}

func webhookSetup(t *testing.T, kind string, rcv *receiver) *setup {
	s := newSetup(t, kind)
	s.cfg.WebhookURL = rcv.hookURL()
	s.cfg.WebhookSecret = "whsec-for-the-test"
	s.cfg.WebhookTimeout = 300 * time.Millisecond
	return s
}

func TestWebhookGetsSignedDeliveriesOfMessagesAndConnEvents(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			rcv := newReceiver(t, 200)
			s := webhookSetup(t, kind, rcv)
			s.start(t)
			store(t, s.bus.nc, message("c", "A", "hello hook"))
			ev := bus.ConnEvent{Kind: bus.ConnConnected, Instance: "web-1"}
			ev.Stamp(session, time.Now())
			if err := bus.Publish(s.bus.nc, subj.Conn(bus.ConnConnected), ev); err != nil {
				t.Fatal(err)
			}
			testwait.For(t, 20*time.Second, "two webhook deliveries", func() bool { return len(rcv.deliveries()) >= 2 })
			byEvent := map[string]delivery{}
			for _, d := range rcv.deliveries() {
				if !verify(s.cfg.WebhookSecret, d.header, d.body) {
					t.Fatalf("bad signature on %s", d.header.Get("X-Blacksky-Event"))
				}
				byEvent[d.header.Get("X-Blacksky-Event")] = d
			}
			var m bus.MsgIn
			d := byEvent["msg.in"]
			if err := json.Unmarshal(d.body, &m); err != nil || m.Seq != 1 || m.Text != "hello hook" || d.header.Get("X-Blacksky-Delivery") != "msg.1" {
				t.Fatalf("msg.in delivery: %+v %v %v", m, err, d.header)
			}
			var c bus.ConnEvent
			if err := json.Unmarshal(byEvent["conn.connected"].body, &c); err != nil || c.Kind != bus.ConnConnected || c.Instance != "web-1" {
				t.Fatalf("conn delivery: %+v %v", c, err)
			}
			if verify("another-secret", d.header, d.body) {
				t.Fatal("the signature verifies under another secret")
			}
		})
	}
}

func TestWebhookRetriesServerErrorsAndTimeoutsUntilDelivered(t *testing.T) {
	rcv := newReceiver(t, 200, 500, 429, 200)
	rcv.sleep[0] = 2 * time.Second // past WebhookTimeout
	s := webhookSetup(t, "postgres", rcv)
	in := s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 60*time.Second, "the fourth attempt", func() bool { return len(rcv.deliveries()) >= 4 })
	ids := map[string]bool{}
	for _, d := range rcv.deliveries() {
		ids[d.header.Get("X-Blacksky-Delivery")] = true
	}
	if len(ids) != 1 {
		t.Fatalf("retries carry different delivery ids: %v", ids)
	}
	testwait.For(t, 20*time.Second, "the delivery recorded as made", func() bool {
		st := openStats(t, s)
		return st.dead == 0 && st.pending == 0
	})
	for _, secret := range []string{"hookpass-secret", "query-secret", "whsec-for-the-test"} {
		if strings.Contains(in.logs.String(), secret) {
			t.Fatalf("a log line shows %q:\n%s", secret, in.logs.String())
		}
	}
}

func TestWebhookClientErrorIsDeadAtOnceAndRetryDeliversItAgain(t *testing.T) {
	rcv := newReceiver(t, 400)
	s := webhookSetup(t, "sqlite", rcv)
	s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 20*time.Second, "a dead delivery", func() bool { return openStats(t, s).dead == 1 })
	if n := len(rcv.deliveries()); n != 1 {
		t.Fatalf("a 400 was tried %d times, want once", n)
	}
	rcv.setScript(200)
	bot := s.bus.conn(t, bus.RoleBot)
	var rep bus.RelayRetryReply
	request(t, bot, subj.RelayRetry(), []byte(`{}`), &rep)
	if !rep.OK || rep.Retried != 1 {
		t.Fatalf("retry: %+v", rep)
	}
	testwait.For(t, 20*time.Second, "the retried delivery", func() bool { return len(rcv.deliveries()) >= 2 })
	testwait.For(t, 20*time.Second, "no dead delivery left", func() bool { st := openStats(t, s); return st.dead == 0 && st.pending == 0 })
}

func TestWebhookGivesUpAfterRetryFor(t *testing.T) {
	rcv := newReceiver(t, 503)
	s := webhookSetup(t, "postgres", rcv)
	s.cfg.WebhookRetryFor = 2 * time.Second
	s.start(t)
	store(t, s.bus.nc, message("c", "A", "x"))
	testwait.For(t, 30*time.Second, "a delivery given up", func() bool { return openStats(t, s).dead == 1 })
	if n := len(rcv.deliveries()); n < 2 {
		t.Fatalf("given up after %d attempts, want a retry first", n)
	}
}

type jobStats struct{ pending, dead int64 }

// openStats counts the session's webhook jobs as the heartbeat does.
func openStats(t testing.TB, s *setup) jobStats {
	t.Helper()
	st, err := s.db.open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	stats, err := st.Stats(context.Background(), session)
	if err != nil {
		t.Fatal(err)
	}
	var out jobStats
	for _, c := range stats.Jobs {
		if c.Kind != "blacksky_relay_webhook" {
			continue
		}
		switch c.State {
		case "discarded", "cancelled":
			out.dead += c.Count
		case "completed":
		default:
			out.pending += c.Count
		}
	}
	return out
}

func TestWebhookURLIsRedactedWhereShown(t *testing.T) {
	got := relay.RedactURL("https://user:pass@example.com/hook?token=abc#frag")
	if strings.Contains(got, "pass") || strings.Contains(got, "abc") || !strings.Contains(got, "example.com/hook") {
		t.Fatalf("RedactURL: %s", got)
	}
}

// The documented retry schedule (CONTRACT: "1 s doubling to 5 minutes") is
// the one River's deliveries and sends wait, without jitter.
func TestDeliveryRetriesDoubleFromOneSecondToFiveMinutes(t *testing.T) {
	b := relay.DefaultBackoff()
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		32 * time.Second, 64 * time.Second, 128 * time.Second, 256 * time.Second, 5 * time.Minute, 5 * time.Minute}
	for i, w := range want {
		if got := b.Step(i + 1); got != w {
			t.Fatalf("retry %d waits %s, want %s", i+1, got, w)
		}
	}
}

// A redirect is not followed: following it would turn the POST into a
// body-less GET whose 2xx would count as delivered. It is dead at once,
// saying why, and nothing reaches the address it points at.
func TestWebhookRedirectIsDeadAtOnceAndNotFollowed(t *testing.T) {
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther, http.StatusTemporaryRedirect} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			var mu sync.Mutex
			var seen []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				mu.Lock()
				seen = append(seen, req.Method+" "+req.URL.Path)
				mu.Unlock()
				if req.URL.Path == "/hook" {
					http.Redirect(w, req, "/moved", code)
					return
				}
				w.WriteHeader(http.StatusOK)
			}))
			t.Cleanup(srv.Close)
			s := newSetup(t, "sqlite")
			s.cfg.WebhookURL = srv.URL + "/hook"
			s.cfg.WebhookTimeout = time.Second
			in := s.start(t)
			store(t, s.bus.nc, message("c", "A", "x"))
			testwait.For(t, 20*time.Second, "a dead delivery", func() bool { return openStats(t, s).dead == 1 })
			mu.Lock()
			got := append([]string(nil), seen...)
			mu.Unlock()
			if len(got) != 1 || got[0] != "POST /hook" {
				t.Fatalf("requests %v, want the one POST, the redirect not followed", got)
			}
			testwait.For(t, 10*time.Second, "the reason in the log", func() bool {
				return strings.Contains(in.logs.String(), "redirect") && strings.Contains(in.logs.String(), strconv.Itoa(code))
			})
		})
	}
}

// A WEBHOOK_RETRY_FOR longer than MESSAGE_RETENTION would retry
// deliveries whose messages are deleted: relay cuts it, saying so.
func TestWebhookRetryLongerThanRetentionIsCutToItWithAWarning(t *testing.T) {
	rcv := newReceiver(t, 200)
	s := webhookSetup(t, "sqlite", rcv)
	s.cfg.Retention = time.Hour
	s.cfg.WebhookRetryFor = 24 * time.Hour
	in := s.start(t)
	if !strings.Contains(in.logs.String(), "WEBHOOK_RETRY_FOR is longer than MESSAGE_RETENTION") {
		t.Fatalf("no warning:\n%s", in.logs.String())
	}
}

// By default webhook deliveries spread over sixteen lanes (a stalling
// receiver holds one lane's chats only), each chat always in the same one.
func TestWebhookDeliveriesSpreadOverSixteenLanes(t *testing.T) {
	rcv := newReceiver(t, 200)
	s := webhookSetup(t, "postgres", rcv)
	s.webhookLanes = -1
	s.start(t)
	for i := range 64 {
		store(t, s.bus.nc, message(fmt.Sprintf("chat-%d", i), "A", "x"))
		store(t, s.bus.nc, message(fmt.Sprintf("chat-%d", i), "B", "y"))
	}
	testwait.For(t, 60*time.Second, "every delivery", func() bool { return len(rcv.deliveries()) >= 128 })
	lanes := s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind = 'blacksky_relay_webhook'
		AND queue NOT IN ('blacksky_relay_webhook_0', 'blacksky_relay_webhook_1', 'blacksky_relay_webhook_2', 'blacksky_relay_webhook_3')`)
	if lanes == 0 {
		t.Fatal("no webhook delivery went past the first four lanes")
	}
	if n := s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind = 'blacksky_relay_webhook'
		AND CAST(substr(queue, length('blacksky_relay_webhook_') + 1) AS INTEGER) >= 16`); n != 0 {
		t.Fatalf("%d deliveries in a lane past the sixteenth", n)
	}
	if n := s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind = 'blacksky_relay_webhook' AND args->>'chat' IS NULL`); n != 0 {
		t.Fatalf("%d deliveries carry no chat", n)
	}
	split := s.db.exec(t, `UPDATE river_job SET attempt = attempt WHERE kind = 'blacksky_relay_webhook' AND queue <> (
		SELECT min(o.queue) FROM river_job o WHERE o.kind = 'blacksky_relay_webhook' AND o.args->>'chat' = river_job.args->>'chat')`)
	if split != 0 {
		t.Fatalf("%d deliveries went through another lane than their chat's first", split)
	}
}
