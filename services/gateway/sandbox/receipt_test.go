package sandbox_test

import (
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testrelay"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// receiptTap records the whatsmeow receipts the sandbox hands the
// gateway's handler, as the handler gets them.
type receiptTap struct {
	*sandbox.Client
	mu   sync.Mutex
	seen []events.Receipt
}

func (tp *receiptTap) OnEventWithSuccess(h func(any) bool) {
	tp.Client.OnEventWithSuccess(func(evt any) bool {
		if e, ok := evt.(*events.Receipt); ok {
			tp.mu.Lock()
			tp.seen = append(tp.seen, *e)
			tp.mu.Unlock()
		}
		return h(evt)
	})
}

func (tp *receiptTap) receipts() []events.Receipt {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.seen)
}

// send asks relay's stand-in to send text to to, waiting for the answer.
func (r *rig) send(to, text string) bus.MsgSendReply {
	r.t.Helper()
	body, _ := json.Marshal(bus.MsgSend{To: to, Text: text})
	msg, err := r.nc.Request(r.subj.MsgSend(), body, 5*time.Second)
	if err != nil {
		r.t.Fatal(err)
	}
	var rep bus.MsgSendReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		r.t.Fatal(err)
	}
	if !rep.OK {
		r.t.Fatalf("send %q to %s: %+v", text, to, rep)
	}
	return rep
}

// receiptsStored waits until relay's stand-in has stored n receipts.
func (r *rig) receiptsStored(n int) []bus.Receipt {
	r.t.Helper()
	var got []bus.Receipt
	testwait.For(r.t, 10*time.Second, "receipts stored", func() bool {
		got = r.relay.Receipts()
		return len(got) >= n
	})
	if len(got) != n {
		r.t.Fatalf("relay stored %d receipts, want %d: %+v", len(got), n, got)
	}
	return got
}

// A send the sandbox accepts for a contact is reported delivered by the
// contact's phone a second later, as whatsmeow's Receipt (type "", chat
// and sender the contact, the send's id, whole seconds), and reaches relay
// as a "delivered" receipt; a refused send and a send to a group are not.
func TestAcceptedSendIsReportedDeliveredASecondLater(t *testing.T) {
	tap := &receiptTap{}
	r := newRig(t, t.TempDir(), func(r *rig) {
		r.wrap = func(c *sandbox.Client) gateway.Conn { tap.Client = c; return tap }
	})
	r.linked()
	r.fault(sandbox.Fault{Kind: sandbox.FaultSendNotOnWhatsApp})
	body, _ := json.Marshal(bus.MsgSend{To: "15550002222", Text: "refused"})
	if _, err := r.nc.Request(r.subj.MsgSend(), body, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	r.clock.Advance(500 * time.Millisecond)
	sent := r.send("15550002222", "hello")
	r.send("120363025246125486@g.us", "hello group")
	if n := len(r.relay.Receipts()); n != 0 {
		t.Fatalf("%d receipts before the phone had the message", n)
	}
	r.clock.Advance(999 * time.Millisecond)
	// Nothing is due yet: a receipt now would be one too early.
	if n := len(r.relay.Receipts()); n != 0 {
		t.Fatalf("%d receipts before the second was up", n)
	}
	r.clock.Advance(time.Millisecond)
	got := r.receiptsStored(1)[0]
	contact := "15550002222@s.whatsapp.net"
	at := t0.Add(1500 * time.Millisecond).Truncate(time.Second)
	if got.Type != "delivered" || !slices.Equal(got.IDs, []string{sent.ID}) || got.Chat != contact || got.Sender != contact || !got.Timestamp.Equal(at) {
		t.Errorf("relay stored %+v, want delivered of %s from %s at %s", got, sent.ID, contact, at)
	}
	evs := tap.receipts()
	if len(evs) != 1 {
		t.Fatalf("the handler got %d receipts, want 1", len(evs))
	}
	e := evs[0]
	if e.Type != types.ReceiptTypeDelivered || e.Chat.String() != contact || e.Sender.String() != contact || e.IsFromMe || e.IsGroup ||
		!slices.Equal(e.MessageIDs, []string{sent.ID}) || !e.Timestamp.Equal(at) {
		t.Errorf("whatsmeow receipt %+v", e)
	}
	testwait.For(t, 5*time.Second, "the receipt acknowledged", func() bool {
		n, acked, err := r.srv.ReceiptDeliveries(t.Context(), sent.ID)
		return err == nil && n == 1 && acked
	})
	// Long after: still only the one receipt (the group's members and the
	// refused send's recipient never answer).
	r.clock.Advance(time.Minute)
	if n := len(r.relay.Receipts()); n != 1 {
		t.Errorf("%d receipts after a minute, want 1", n)
	}
}

// A read receipt asked for sent messages names them all in one receipt,
// from the contact, stamped with the sandbox clock's whole second.
func TestReceiptRequestReportsSentMessagesRead(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	a := r.send("15550003333", "first")
	b := r.send("15550003333", "second")
	r.clock.Advance(time.Second)
	r.receiptsStored(2) // the automatic delivered ones
	r.clock.Advance(2300 * time.Millisecond)
	q, err := r.srv.Receipt(t.Context(), sandbox.ReceiptRequest{IDs: []string{a.ID, b.ID}, Type: sandbox.ReceiptRead})
	if err != nil {
		t.Fatal(err)
	}
	at := t0.Add(3 * time.Second)
	if q.Chat.String() != "15550003333@s.whatsapp.net" || !q.Timestamp.Equal(at) {
		t.Errorf("queued %+v, want the contact at %s", q, at)
	}
	got := r.receiptsStored(3)[2]
	if got.Type != "read" || !slices.Equal(got.IDs, []string{a.ID, b.ID}) || got.Chat != "15550003333@s.whatsapp.net" || !got.Timestamp.Equal(at) {
		t.Errorf("relay stored %+v, want read of %s and %s", got, a.ID, b.ID)
	}
	for _, id := range []string{a.ID, b.ID} {
		testwait.For(t, 5*time.Second, "both receipts of "+id+" acknowledged", func() bool {
			n, acked, err := r.srv.ReceiptDeliveries(t.Context(), id)
			return err == nil && n == 2 && acked
		})
	}
}

// A receipt is refused, with the reason, for what no contact could report:
// a message the bot never sent, a send to a group, messages to different
// contacts, a type the sandbox does not send; and while no device is
// linked.
func TestReceiptRequestIsRefusedForWhatNoContactCouldReport(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.rec.next(t, bus.ConnConnecting)
	r.rec.next(t, bus.ConnQR)
	if _, err := r.srv.Receipt(t.Context(), sandbox.ReceiptRequest{IDs: []string{"3EB0000000000000000000"}, Type: sandbox.ReceiptRead}); !sandbox.IsBadRequest(err) || !strings.Contains(err.Error(), "not linked") {
		t.Errorf("receipt before linking: %v, want a bad request naming the link", err)
	}
	r.linked2()
	one := r.send("15550004444", "one")
	other := r.send("15550005555", "other")
	group := r.send("120363025246125486@g.us", "group")
	for _, c := range []struct {
		name string
		req  sandbox.ReceiptRequest
		want string
	}{
		{"unknown id", sandbox.ReceiptRequest{IDs: []string{"3EB0FFFFFFFFFFFFFFFFFF"}, Type: sandbox.ReceiptRead}, "no message the bot sent"},
		{"group send", sandbox.ReceiptRequest{IDs: []string{group.ID}, Type: sandbox.ReceiptRead}, "no group members"},
		{"two contacts", sandbox.ReceiptRequest{IDs: []string{one.ID, other.ID}, Type: sandbox.ReceiptRead}, "one contact's"},
		{"played", sandbox.ReceiptRequest{IDs: []string{one.ID}, Type: "played"}, "type"},
		{"no id", sandbox.ReceiptRequest{Type: sandbox.ReceiptRead}, "id"},
	} {
		_, err := r.srv.Receipt(t.Context(), c.req)
		if !sandbox.IsBadRequest(err) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want a bad request naming %q", c.name, err, c.want)
		}
	}
}

// A receipt relay could not store is not acknowledged and comes again
// after the next reconnect (whatsmeow's handleReceipt does not ack a
// receipt whose handler failed; there is no buffer for receipts, so it is
// dispatched again), then is stored and acknowledged.
func TestReceiptWhoseStoreFailedComesAgainAfterReconnect(t *testing.T) {
	r := newRig(t, t.TempDir())
	r.linked()
	sent := r.send("15550006666", "read me")
	r.clock.Advance(time.Second)
	r.receiptsStored(1)
	r.relay.SetMode(testrelay.Refuse)
	requests := r.relay.Requests()
	if _, err := r.srv.Receipt(t.Context(), sandbox.ReceiptRequest{IDs: []string{sent.ID}, Type: sandbox.ReceiptRead}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the refused store", func() bool { return r.relay.Requests() == requests+1 })
	if n, acked, err := r.srv.ReceiptDeliveries(t.Context(), sent.ID); err != nil || n != 2 || acked {
		t.Fatalf("after the refusal: %d deliveries, all acked %v (%v); want 2, not all", n, acked, err)
	}
	r.relay.SetMode(testrelay.Store)
	r.reconnect()
	got := r.receiptsStored(2)[1]
	if got.Type != "read" || !slices.Equal(got.IDs, []string{sent.ID}) {
		t.Errorf("redelivered receipt %+v", got)
	}
	testwait.For(t, 5*time.Second, "the redelivery acknowledged", func() bool {
		n, acked, err := r.srv.ReceiptDeliveries(t.Context(), sent.ID)
		return err == nil && n == 3 && acked
	})
}

// A receipt queued while the gateway is away is in the server file: it
// reaches the gateway after a restart.
func TestQueuedReceiptSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	r := newRig(t, dir)
	r.linked()
	sent := r.send("15550007777", "before the restart")
	r.fault(sandbox.Fault{Kind: sandbox.FaultDialHang})
	r.rec.next(t, bus.ConnDisconnected)
	r.rec.next(t, bus.ConnReconnecting)
	r.clock.Advance(1500 * time.Millisecond)
	r.rec.next(t, bus.ConnConnecting) // hung: nothing can be delivered
	if _, err := r.srv.Receipt(t.Context(), sandbox.ReceiptRequest{IDs: []string{sent.ID}, Type: sandbox.ReceiptRead}); err != nil {
		t.Fatal(err)
	}
	if n := len(r.relay.Receipts()); n != 0 {
		t.Fatalf("%d receipts reached relay while the dial hung", n)
	}
	r.stop()

	r2 := newRig(t, dir)
	r2.rec.next(t, bus.ConnConnecting)
	r2.rec.next(t, bus.ConnConnected)
	// The new process's fake clock starts at t0 again, before the
	// receipts' due times: let it catch up.
	var got []bus.Receipt
	r2.advanceUntil(time.Second, "both receipts", func() bool {
		got = r2.relay.Receipts()
		return len(got) >= 2
	})
	kinds := map[string]bool{}
	for _, rc := range got {
		kinds[rc.Type] = slices.Equal(rc.IDs, []string{sent.ID})
	}
	if len(got) != 2 || !kinds["delivered"] || !kinds["read"] {
		t.Errorf("after the restart relay stored %+v, want delivered and read of %s", got, sent.ID)
	}
}
