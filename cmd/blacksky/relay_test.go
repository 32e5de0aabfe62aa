package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

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
