package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// receiptHook is a webhook endpoint that keeps the msg.receipt deliveries
// whose signature verifies (docs/relay.md's check) and counts the others.
type receiptHook struct {
	check *receiver // its verify only
	srv   *httptest.Server

	mu    sync.Mutex
	byID  map[string]bus.Receipt // X-Blacksky-Delivery -> body
	bad   []string
	times int // msg.receipt requests
}

func newReceiptHook(t *testing.T, secret string) *receiptHook {
	t.Helper()
	h := &receiptHook{check: &receiver{secret: secret}, byID: map[string]bus.Receipt{}}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return
		}
		if req.Header.Get("X-Blacksky-Event") != "msg.receipt" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		delivery := req.Header.Get("X-Blacksky-Delivery")
		h.mu.Lock()
		defer h.mu.Unlock()
		h.times++
		if why := h.check.verify(req, body); why != "" {
			h.bad = append(h.bad, delivery+": "+why)
			http.Error(w, why, http.StatusUnauthorized)
			return
		}
		var rc bus.Receipt
		if err := json.Unmarshal(body, &rc); err != nil || !strings.HasPrefix(delivery, "receipt.") {
			h.bad = append(h.bad, fmt.Sprintf("%s: body %.200s (%v)", delivery, body, err))
		}
		h.byID[delivery] = rc
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *receiptHook) receipts() []bus.Receipt {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]bus.Receipt, 0, len(h.byID))
	for _, rc := range h.byID {
		out = append(out, rc)
	}
	return out
}

// findReceipt is the receipt of type typ naming exactly ids, if any.
func findReceipt(rcs []bus.Receipt, typ string, ids ...string) (bus.Receipt, bool) {
	for _, rc := range rcs {
		if rc.Type == typ && slices.Equal(rc.IDs, ids) {
			return rc, true
		}
	}
	return bus.Receipt{}, false
}

// The contact's phone reports messages the bot sent delivered (by itself,
// a second after each send) and, asked by `blacksky sandbox receipt`
// (P.sandbox.receipt), read: the gateway hands whatsmeow's receipts to
// relay, which publishes them on P.msg.receipt and POSTs them, signed, as
// msg.receipt to the webhook. A receipt for an id the bot never sent is
// refused.
func TestReceiptsOfASentMessageReachTheBusAndTheWebhook(t *testing.T) {
	t.Parallel()
	secret := randomHex(t, 16)
	hook := newReceiptHook(t, secret)
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), db.URL).with("SESSION_ID", "E2E-Receipt", "WEBHOOK_URL", hook.srv.URL+"/hook",
		"WEBHOOK_SECRET", secret, "WEBHOOK_EVENTS", "msg.in,msg.receipt")
	run(t, bin, e, "migrate")
	p := start(t, bin, "run (receipts)", e, "run")
	w := watchSandbox(t, e, p)
	// The bot's view: P.msg.receipt as a NATS_TOKEN holder reads it.
	bot := botConn(t, e, "e2e-receipt-bot")
	var mu sync.Mutex
	var onBus []bus.Receipt
	if _, err := bot.Subscribe(w.subj.MsgReceipt(), func(m *nats.Msg) {
		var rc bus.Receipt
		if json.Unmarshal(m.Data, &rc) == nil {
			mu.Lock()
			onBus = append(onBus, rc)
			mu.Unlock()
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := bot.Flush(); err != nil {
		t.Fatal(err)
	}
	busReceipts := func() []bus.Receipt {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(onBus)
	}
	w.link()

	const contact = "4915100000031@s.whatsapp.net"
	send := func(text string) bus.MsgSendReply {
		t.Helper()
		var rep bus.MsgSendReply
		w.request(w.subj.MsgSend(), bus.MsgSend{To: "4915100000031", Text: text}, &rep)
		if !rep.OK || rep.ID == "" || rep.Timestamp == nil {
			t.Fatalf("msg.send %q = %+v, want ok with an id", text, rep)
		}
		return rep
	}
	first, second := send("first, to be read"), send("second, to be read")
	for _, s := range []bus.MsgSendReply{first, second} {
		var got bus.Receipt
		waitFor(t, 30*time.Second, "P.msg.receipt delivered of "+s.ID, func() bool {
			var ok bool
			got, ok = findReceipt(busReceipts(), "delivered", s.ID)
			return ok
		})
		if got.Chat != contact || got.Sender != contact || got.Session != e["SESSION_ID"] {
			t.Errorf("delivered receipt of %s: %+v, want chat and sender %s", s.ID, got, contact)
		}
		// The phone has it a second after the server took it; WhatsApp
		// stamps whole seconds.
		if d := got.Timestamp.Sub(*s.Timestamp); d < time.Second || d > 2*time.Second {
			t.Errorf("delivered receipt of %s stamped %s, %s after the send; want 1 to 2 s", s.ID, got.Timestamp, d)
		}
	}

	// The contact reads both, in one receipt, asked as an operator would.
	out := run(t, bin, e, "sandbox", "receipt", "--id", first.ID, "--id", second.ID, "--type", "read")
	var rep bus.SandboxReceiptReply
	if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.OK || rep.Chat != contact || rep.Timestamp == nil {
		t.Fatalf("blacksky sandbox receipt = %q (%v), want ok from %s", out, err, contact)
	}
	var read bus.Receipt
	waitFor(t, 30*time.Second, "P.msg.receipt read", func() bool {
		var ok bool
		read, ok = findReceipt(busReceipts(), "read", first.ID, second.ID)
		return ok
	})
	if read.Chat != contact || read.Sender != contact || !read.Timestamp.Equal(*rep.Timestamp) {
		t.Errorf("read receipt %+v, want from %s at %s", read, contact, rep.Timestamp)
	}

	var unknown bus.SandboxReceiptReply
	w.request(w.subj.SandboxReceipt(), bus.SandboxReceiptRequest{ID: "3EB0FFFFFFFFFFFFFFFFFF", Type: "read"}, &unknown)
	if unknown.OK || !strings.Contains(unknown.Error, "no message the bot sent") {
		t.Errorf("sandbox.receipt of an unknown id = %+v, want ok:false with the reason", unknown)
	}

	waitFor(t, 30*time.Second, "the webhook's three msg.receipt deliveries", func() bool { return len(hook.receipts()) >= 3 })
	want := busReceipts()
	if len(want) != 3 {
		t.Errorf("P.msg.receipt carried %d receipts, want 3 (two delivered, one read): %+v", len(want), want)
	}
	for _, b := range want {
		h, ok := findReceipt(hook.receipts(), b.Type, b.IDs...)
		if !ok || h.Chat != b.Chat || h.Sender != b.Sender || !h.Timestamp.Equal(b.Timestamp) {
			t.Errorf("webhook msg.receipt %s %v: %+v (found %v), want as on the bus %+v", b.Type, b.IDs, h, ok, b)
		}
	}
	hook.mu.Lock()
	if len(hook.bad) > 0 || len(hook.byID) != 3 {
		t.Errorf("webhook: %d distinct msg.receipt deliveries in %d requests, bad: %v", len(hook.byID), hook.times, hook.bad)
	}
	hook.mu.Unlock()

	p.stop(t, 30*time.Second)
	checkLogs(t, []string{e["NATS_TOKEN"], e["HEALTH_TOKEN"], e["SESSION_ENCRYPTION_KEY"], secret}, p)
}
