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
	} {
		v := ask(t, nc, c.subject, c.body)
		if v["ok"] != false || !strings.Contains(v["error"].(string), c.want) {
			t.Errorf("%s %s: %v, want ok:false naming %s", bus.Kind(c.subject), c.body, v, c.want)
		}
	}
}

func TestInjectIsCommittedBeforeTheAnswer(t *testing.T) {
	nc, subj, srv := serve(t)
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

// An inject is answered at acceptance, once its messages are committed,
// not when the last is delivered: at a slow rate delivery may take days,
// far past the bus's reply window (bus.ResponseWindow).
func TestSlowInjectIsAnsweredAtAcceptance(t *testing.T) {
	nc, subj, srv := serve(t)
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
