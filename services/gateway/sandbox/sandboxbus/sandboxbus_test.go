package sandboxbus_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox/sandboxbus"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func serve(t *testing.T) (*nats.Conn, bus.Subjects, *sandbox.Server) {
	t.Helper()
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{Path: filepath.Join(t.TempDir(), "sandbox.db"), Seed: "s", Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ns, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	nc, err := ns.Connect("sandbox", log)
	if err != nil {
		t.Fatal(err)
	}
	client, err := ns.Connect("test", log)
	if err != nil {
		t.Fatal(err)
	}
	svc := &sandboxbus.Service{NC: nc, Server: srv, Session: "Bus-Test", Clock: clock}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		client.Close()
		nc.Close()
		ns.Shutdown()
		_ = srv.Close()
	})
	subj := bus.NewSubjects("Bus-Test")
	testwait.For(t, 5*time.Second, "the sandbox subjects", func() bool {
		_, err := client.Request(subj.SandboxOutbox(), nil, time.Second)
		return err == nil
	})
	return client, subj, srv
}

func ask(t *testing.T, nc *nats.Conn, subject, body string) map[string]any {
	t.Helper()
	m, err := nc.Request(subject, []byte(body), 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", subject, err)
	}
	var v map[string]any
	if err := json.Unmarshal(m.Data, &v); err != nil {
		t.Fatalf("%s answered %q: %v", subject, m.Data, err)
	}
	return v
}

func TestBadRequestsGetOkFalseWithTheReason(t *testing.T) {
	nc, subj, _ := serve(t)
	for _, c := range []struct{ subject, body, want string }{
		{subj.SandboxInject(), `{"from":"123"}`, `"from"`},
		{subj.SandboxInject(), `{"from":"1234567","type":"hologram"}`, "unknown"},
		{subj.SandboxInject(), `{"from":"1234567","type":"poll","text":"q"}`, "options"},
		{subj.SandboxInject(), `not json`, "JSON object"},
		{subj.SandboxFault(), `{"kind":"meteor"}`, "unknown"},
		{subj.SandboxFault(), `{"kind":"temporary_ban","expire":"soon"}`, "expire"},
		{subj.SandboxFault(), `{"kind":"disconnect"}`, "not connected"},
		{subj.SandboxLink(), `{}`, "not pairing"},
		{subj.SandboxOutbox(), `{"limit":-1}`, "limit"},
		{subj.SandboxReceipt(), `{"type":"read"}`, `"id"`},
		{subj.SandboxReceipt(), `{"id":"3EB0AB","type":"played"}`, `"type"`},
		{subj.SandboxReceipt(), `{"id":"3EB0AB","type":"read"}`, "not linked"},
	} {
		v := ask(t, nc, c.subject, c.body)
		if v["ok"] != false || !strings.Contains(v["error"].(string), c.want) {
			t.Errorf("%s %s: %v, want ok:false naming %s", bus.Kind(c.subject), c.body, v, c.want)
		}
	}
}

// linkOffline links a device to srv and drops its socket: messages
// injected then wait in the server file.
func linkOffline(t *testing.T, srv *sandbox.Server) {
	t.Helper()
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(t.TempDir(), "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the link", func() bool {
		_, err := srv.Link(t.Context(), "")
		return err == nil
	})
	testwait.For(t, 5*time.Second, "logged in", c.IsConnected)
	c.Disconnect()
}

func TestInjectIsCommittedBeforeTheAnswer(t *testing.T) {
	nc, subj, srv := serve(t)
	linkOffline(t, srv)
	v := ask(t, nc, subj.SandboxInject(), `{"from":"4915112345678","text":"hi","count":150}`)
	if v["ok"] != true || v["count"].(float64) != 150 || len(v["ids"].([]any)) != bus.MaxSandboxIDs {
		t.Fatalf("inject reply %v", v)
	}
	st, err := srv.Stats(t.Context())
	if err != nil || st.Unacked != 150 {
		t.Errorf("after the answer the server file holds %+v (%v), want 150 unacked", st, err)
	}
	if v := ask(t, nc, subj.SandboxFault(), `{"kind":"send_rate_limited","count":2}`); v["ok"] != true {
		t.Errorf("fault: %v", v)
	}
	if v := ask(t, nc, subj.SandboxOutbox(), ``); v["ok"] != true {
		t.Errorf("outbox: %v", v)
	}
}

// A receipt request is answered once the receipt is committed, with the
// contact it comes from; an id the bot never sent gets ok:false.
func TestReceiptIsAnsweredWithItsContact(t *testing.T) {
	nc, subj, srv := serve(t)
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(t.TempDir(), "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	received := make(chan *events.Receipt, 4)
	c.OnEvent(func(evt any) {
		if r, ok := evt.(*events.Receipt); ok {
			received <- r
		}
	})
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the link", func() bool {
		_, err := srv.Link(t.Context(), "")
		return err == nil
	})
	testwait.For(t, 5*time.Second, "logged in", c.IsConnected)
	to := types.NewJID("4915112345678", types.DefaultUserServer)
	sent, err := c.SendText(t.Context(), to, "hi")
	if err != nil {
		t.Fatal(err)
	}
	v := ask(t, nc, subj.SandboxReceipt(), `{"id":"`+sent.ID+`","type":"read"}`)
	if v["ok"] != true || v["chat"] != to.String() || v["timestamp"] != "2026-11-26T12:00:00Z" {
		t.Fatalf("receipt reply %v", v)
	}
	select {
	case r := <-received:
		if r.Type != types.ReceiptTypeRead || len(r.MessageIDs) != 1 || r.MessageIDs[0] != sent.ID || r.Chat != to {
			t.Errorf("the client got %+v, want the read receipt of %s", r, sent.ID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no receipt reached the client")
	}
	if v := ask(t, nc, subj.SandboxReceipt(), `{"ids":["3EB0FFFF"],"type":"delivered"}`); v["ok"] != false || !strings.Contains(v["error"].(string), "no message the bot sent") {
		t.Errorf("receipt of an unknown id: %v", v)
	}
}

// An inject is answered at acceptance, once its messages are committed,
// not when the last is delivered: at a slow rate delivery may take days,
// far past the bus's reply window (bus.ResponseWindow).
func TestSlowInjectIsAnsweredAtAcceptance(t *testing.T) {
	nc, subj, srv := serve(t)
	// Messages go to the linked device: link one first.
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(t.TempDir(), "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	c.OnEvent(func(any) {})
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the link", func() bool {
		_, err := srv.Link(t.Context(), "")
		return err == nil
	})
	// 1000 messages at one every 1000 s: the last is due in 11.5 days.
	v := ask(t, nc, subj.SandboxInject(), `{"from":"4915112345678","text":"hi","count":1000,"rate":0.001}`)
	if v["ok"] != true || v["count"].(float64) != 1000 {
		t.Fatalf("inject reply %v", v)
	}
	st, err := srv.Stats(t.Context())
	if err != nil || st.Unacked != 1000 {
		t.Errorf("after the answer the server file holds %+v (%v), want 1000 queued", st, err)
	}
}

// TestRunReturnsOnlyAfterTheRequestsUnderWay: a request being handled when
// Run is told to end is finished and answered before Run returns, so the
// server file is never closed under it.
func TestRunReturnsOnlyAfterTheRequestsUnderWay(t *testing.T) {
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	srv, err := sandbox.OpenServer(t.Context(), sandbox.ServerOptions{Path: filepath.Join(dir, "sandbox.db"), Seed: "s", Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Close() }()
	c, err := srv.Open(t.Context(), sandbox.Options{Path: filepath.Join(dir, "session.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	// The bot's handler holds the message until released: a disconnect
	// fault waits for it, as for whatsmeow's handlers.
	release, holding := make(chan struct{}), make(chan struct{}, 1)
	c.OnEvent(func(evt any) {
		if _, ok := evt.(*events.Message); ok {
			holding <- struct{}{}
			<-release
		}
	})
	if err := c.Connect(t.Context()); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "the link", func() bool {
		_, err := srv.Link(t.Context(), "")
		return err == nil
	})
	testwait.For(t, 5*time.Second, "logged in", c.IsConnected)
	if _, err := srv.Inject(t.Context(), sandbox.Inject{From: "15550001234", Content: sandbox.Content{Text: "hold"}}); err != nil {
		t.Fatal(err)
	}
	<-holding

	ns, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	log := slog.New(slog.DiscardHandler)
	nc, err := ns.Connect("sandbox", log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	client, err := ns.Connect("test", log)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	svc := &sandboxbus.Service{NC: nc, Server: srv, Session: "Bus-Test", Clock: clock}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	subj := bus.NewSubjects("Bus-Test")
	testwait.For(t, 5*time.Second, "the sandbox subjects", func() bool {
		_, err := client.Request(subj.SandboxOutbox(), nil, time.Second)
		return err == nil
	})
	replies := make(chan *nats.Msg, 1)
	inbox := nats.NewInbox()
	if _, err := client.ChanSubscribe(inbox, replies); err != nil {
		t.Fatal(err)
	}
	if err := client.PublishRequest(subj.SandboxFault(), inbox, []byte(`{"kind":"disconnect"}`)); err != nil {
		t.Fatal(err)
	}
	// The fault handler is under way once the socket is closed: it waits
	// for the held delivery.
	testwait.For(t, 5*time.Second, "the disconnect under way", func() bool { return !c.IsConnected() })
	cancel()
	select {
	case err := <-done:
		t.Fatalf("Run returned (%v) while a request was under way", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-replies:
		if !strings.Contains(string(m.Data), `"ok":true`) {
			t.Errorf("the request under way was answered %s", m.Data)
		}
	case <-time.After(5 * time.Second):
		t.Error("the request under way was not answered")
	}
}
