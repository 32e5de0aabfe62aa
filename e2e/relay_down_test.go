package e2e

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// The compose topology in sandbox mode with relay stopped: the gateway
// keeps WhatsApp's messages unacknowledged, /readyz says relay is not
// running, and once relay is back the gateway reconnects so WhatsApp
// delivers them again, and they reach the bot (CONTRACT guarantee 9).
func TestRelayDownLeavesMessagesUnacknowledgedUntilItIsBack(t *testing.T) {
	t.Parallel()
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	dataDir := t.TempDir()
	session := "E2E-RelayDown-" + randomHex(t, 3)
	natsAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	port := strconv.Itoa(freePort(t))
	dotenv := map[string]string{
		"NATS_TOKEN": randomHex(t, 32), "NATS_INTERNAL_SECRET": randomHex(t, 32), "HEALTH_TOKEN": randomHex(t, 32),
		"SESSION_ENCRYPTION_KEY": randomHex(t, 32), "POSTGRES_PASSWORD": randomHex(t, 32),
	}
	svcs := composeTopology(t, dotenv)
	local := func(name string) env {
		e := svcs[name].env.with(
			"SESSION_ID", session, "DATA_DIR", dataDir, "DATABASE_URL", db.URL, "PORT", port,
			// The sandbox is refused in production: the compose file's
			// NODE_ENV gives way to development here.
			"NODE_ENV", "development", "WHATSAPP_SANDBOX", "true", "SANDBOX_SEED", "e2e",
			"RECONNECT_MIN", "100ms", "RECONNECT_MAX", "400ms", "SHUTDOWN_TIMEOUT", "15s",
		)
		if _, ok := e["NATS_LISTEN"]; ok {
			e["NATS_LISTEN"] = natsAddr
		}
		if _, ok := e["NATS_URL"]; ok {
			e["NATS_URL"] = "nats://" + natsAddr
		}
		return e
	}
	run(t, bin, local("backup"), "migrate")
	backup := start(t, bin, "backup", local("backup"), svcs["backup"].args...)
	relayProc := start(t, bin, "relay", local("relay"), svcs["relay"].args...)
	gateway := start(t, bin, "gateway", local("gateway"), svcs["gateway"].args...)
	health := start(t, bin, "health", local("health"), svcs["health"].args...)
	procs := []*proc{backup, relayProc, gateway, health}

	bot := local("gateway").with("NATS_LISTEN", natsAddr)
	w := watchSandbox(t, bot, gateway)
	beats := watchHeartbeats(t, w.nc, w.subj)
	w.link()
	w.msgIn(w.inject(bus.SandboxInjectRequest{From: "4915100000030", Text: "relay is up"})...)
	waitFor(t, 30*time.Second, "/readyz 200 with every service up", func() bool {
		code, _ := readyz(t, port)
		return code == 200
	})

	relayProc.stop(t, 25*time.Second)
	stoppedAt := time.Now()
	ids := w.inject(bus.SandboxInjectRequest{From: "4915100000031", Text: "while relay is down", Count: 3})
	waitFor(t, 30*time.Second, "the gateway to leave them unacknowledged", func() bool {
		return gatewayBeat(t, beats).RelayUnacked >= int64(len(ids))
	})
	if err := gatewayBeat(t, beats).LastRelayError; !strings.Contains(err, "relay not running") {
		t.Errorf("gateway heartbeat's last_relay_error = %q, want relay not running", err)
	}
	var body string
	waitFor(t, 40*time.Second, "/readyz to say relay is not running", func() bool {
		var code int
		code, body = readyz(t, port)
		return code == 503 && strings.Contains(body, "relay not running")
	})
	t.Logf("/readyz 503 %s after relay stopped: %s", time.Since(stoppedAt).Round(100*time.Millisecond), strings.Join(strings.Fields(body), " "))
	for _, m := range on[bus.MsgIn](w, w.subj.MsgIn()) {
		for _, id := range ids {
			if m.ID == id {
				t.Fatalf("message %s reached P.msg.in while relay was down", id)
			}
		}
	}

	relayProc = start(t, bin, "relay (again)", local("relay"), svcs["relay"].args...)
	procs = append(procs, relayProc)
	backAt := time.Now()
	got := w.msgIn(ids...)
	t.Logf("the messages arrived %s after relay started again", time.Since(backAt).Round(100*time.Millisecond))
	seqs := map[int64]bool{}
	for _, id := range ids {
		seqs[got[id].Seq] = true
	}
	if len(seqs) != len(ids) {
		t.Errorf("the redelivered messages carry seqs %v, want %d distinct ones", seqs, len(ids))
	}
	if n := gatewayBeat(t, beats).RelayRedeliveryReconnects; n < 1 {
		waitFor(t, 10*time.Second, "the gateway heartbeat to count its redelivery reconnect", func() bool {
			return gatewayBeat(t, beats).RelayRedeliveryReconnects >= 1
		})
	}
	waitFor(t, 30*time.Second, "/readyz 200 again", func() bool {
		code, _ := readyz(t, port)
		return code == 200
	})

	for _, p := range []*proc{health, gateway, backup, relayProc} {
		p.stop(t, 25*time.Second)
	}
	checkLogs(t, []string{dotenv["NATS_TOKEN"], dotenv["NATS_INTERNAL_SECRET"], dotenv["HEALTH_TOKEN"], dotenv["SESSION_ENCRYPTION_KEY"]}, procs...)
}
