package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// TestRelayCommands runs the relay role as compose does (its own process
// on PostgreSQL and a shared NATS), stores messages as the gateway would,
// and reads them back with blacksky messages; deliveries retry answers.
func TestRelayCommands(t *testing.T) {
	db := testdb.Postgres(t)
	const token = "relay-cmd-test-token"
	const secret = "relay-cmd-internal-secret"
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: token, InternalSecret: secret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	env := map[string]string{
		"SESSION_ID": "Cmd Test", "DATA_DIR": t.TempDir(), "DATABASE_URL": db.URL, "NATS_URL": srv.ClientURL(),
		"NATS_TOKEN": token, "NATS_INTERNAL_SECRET": secret, "SHUTDOWN_TIMEOUT": "20s", "LOG_LEVEL": "warn",
	}
	ctx := context.Background()
	code, _, errOut := runMain(t, ctx, env, "messages", "--timeout", "5s")
	if code != 1 || !strings.Contains(errOut, "no relay answers") {
		t.Fatalf("messages without relay: exit %d, %q", code, errOut)
	}
	if code, _, _ := runMain(t, ctx, env, "messages", "--after", "-1"); code != 2 {
		t.Fatalf("messages --after -1: exit %d, want 2", code)
	}
	if code, _, _ := runMain(t, ctx, env, "deliveries", "resend"); code != 2 {
		t.Fatalf("deliveries resend: exit %d, want 2", code)
	}

	runRole(t, env, "relay")
	gw, err := srv.Connect("gateway-stand-in", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	subj := bus.NewSubjects("Cmd Test")
	for i := range 3 {
		m := bus.MsgIn{ID: fmt.Sprintf("ID%d", i), Chat: "c@s.whatsapp.net", Text: fmt.Sprintf("text %d", i)}
		var rep bus.RelayStoreReply
		testwait.For(t, 30*time.Second, "relay to store", func() bool {
			err := bus.Request(ctx, gw, subj.RelayStore(), bus.RelayStoreRequest{Message: &m}, &rep)
			return err == nil && rep.OK
		})
	}
	code, out, errOut := runMain(t, ctx, env, "messages", "--after", "1")
	if code != 0 {
		t.Fatalf("messages: exit %d, %q", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("messages --after 1 printed %q, want two lines", out)
	}
	for i, line := range lines {
		var m bus.MsgIn
		if err := json.Unmarshal([]byte(line), &m); err != nil || m.Seq != int64(i+2) || m.Text != fmt.Sprintf("text %d", i+1) {
			t.Fatalf("line %d: %q (%v)", i, line, err)
		}
	}
	code, out, errOut = runMain(t, ctx, env, "deliveries", "retry")
	if code != 0 || !strings.Contains(out, `"ok":true`) || !strings.Contains(out, `"retried":0`) {
		t.Fatalf("deliveries retry: exit %d, %q, %q", code, out, errOut)
	}
}

// blacksky messages pages through P.msg.replay: relay answers at most a
// page (its default, or fewer near the payload limit), and the command asks
// again after the last seq until a page comes back empty, or until --limit
// messages are printed.
func TestMessagesPagesThroughEveryStoredMessage(t *testing.T) {
	const token = "relay-pages-test-token"
	const secret = "relay-pages-internal-secret"
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: token, InternalSecret: secret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	// A relay stand-in holding seqs 1..250 that answers at most 100 a page.
	const stored, page = 250, 100
	relayNC, err := srv.ConnectAs(bus.RoleRelay, "relay-stand-in", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer relayNC.Close()
	subj := bus.NewSubjects("Pages")
	var mu sync.Mutex
	var asked []bus.MsgReplayRequest
	sub, err := relayNC.Subscribe(subj.MsgReplay(), func(m *nats.Msg) {
		req, err := bus.DecodeMsgReplay(m.Data)
		if err != nil {
			_ = bus.Respond(m, bus.MsgReplayReply{Messages: []bus.MsgIn{}, Error: err.Error()})
			return
		}
		mu.Lock()
		asked = append(asked, req)
		mu.Unlock()
		n := page
		if req.Limit > 0 {
			n = min(n, req.Limit)
		}
		msgs := []bus.MsgIn{}
		for seq := req.AfterSeq + 1; seq <= stored && len(msgs) < n; seq++ {
			msgs = append(msgs, bus.MsgIn{ID: fmt.Sprintf("ID%d", seq), Chat: "c", Text: "t", Seq: seq})
		}
		_ = bus.Respond(m, bus.MsgReplayReply{OK: true, Messages: msgs})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := relayNC.Flush(); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"SESSION_ID": "Pages", "DATA_DIR": t.TempDir(), "NATS_URL": srv.ClientURL(),
		"NATS_TOKEN": token, "LOG_LEVEL": "warn",
	}
	seqs := func(out string) []int64 {
		var got []int64
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			var m bus.MsgIn
			if err := json.Unmarshal([]byte(line), &m); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			got = append(got, m.Seq)
		}
		return got
	}
	ctx := context.Background()
	for _, tt := range []struct {
		args        []string
		first, last int64
	}{
		{[]string{"messages", "--after", "20"}, 21, stored},
		{[]string{"messages"}, 1, stored},
		{[]string{"messages", "--after", "10", "--limit", "150"}, 11, 160},
		{[]string{"messages", "--limit", "5"}, 1, 5},
	} {
		code, out, errOut := runMain(t, ctx, env, tt.args...)
		if code != 0 {
			t.Fatalf("%v: exit %d, %q", tt.args, code, errOut)
		}
		got := seqs(out)
		if int64(len(got)) != tt.last-tt.first+1 || got[0] != tt.first || got[len(got)-1] != tt.last {
			t.Fatalf("%v printed %d messages (%d..%d), want %d..%d", tt.args, len(got), got[0], got[len(got)-1], tt.first, tt.last)
		}
		for i := 1; i < len(got); i++ {
			if got[i] != got[i-1]+1 {
				t.Fatalf("%v: seq %d after %d", tt.args, got[i], got[i-1])
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, req := range asked {
		if req.Limit < 0 || req.Limit > bus.MaxReplayLimit {
			t.Fatalf("asked for limit %d", req.Limit)
		}
	}
}
