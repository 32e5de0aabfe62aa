package e2e

import (
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// TestBotCannotSpeakForWhatsApp runs the built binary as a Heroku web dyno
// (production, app.json's environment) and plays a bot holding NATS_TOKEN,
// found the way the CLI finds it (DATA_DIR/bus.json), that tries each
// forgery of the security review: the attacker's QR code on /pair, a
// heartbeat from the future, a lease loss, an answer to the restore
// request. Each is refused by the bus; the bot's own rights still work.
func TestBotCannotSpeakForWhatsApp(t *testing.T) {
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	generated := map[string]string{}
	disk := t.TempDir()
	if err := wastore.Create(t.Context(), filepath.Join(disk, "session.db"), 0); err != nil {
		t.Fatalf("create session store: %v", err)
	}
	port := freePort(t)
	e := herokuEnv(t, db.URL, disk, port, generated)
	run(t, bin, e, "migrate")
	web := start(t, bin, "web.1", e, "run")
	waitHealthz(t, web, port)
	token := generated["NATS_TOKEN"]

	var f bus.BusFile
	waitFor(t, 20*time.Second, "bus.json", func() bool {
		var err error
		f, err = bus.ReadBusFile(disk)
		return err == nil
	})
	if f.Token != "" {
		t.Fatal("bus.json holds a copy of the NATS_TOKEN the operator set")
	}

	var mu sync.Mutex
	var refused []string
	nc, err := bus.Dial(f.URL, bus.BotCredential(token), "forger", 5*time.Second, slog.New(slog.DiscardHandler),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				mu.Lock()
				refused = append(refused, err.Error())
				mu.Unlock()
			}
		}))
	if err != nil {
		t.Fatalf("the bots' credential: %v", err)
	}
	t.Cleanup(nc.Close)
	subj := bus.NewSubjects(e["SESSION_ID"])

	// Everything the bot may read, it reads: its forgeries would come back.
	echoes := make(chan *nats.Msg, 256)
	for _, s := range []string{subj.ConnAll(), subj.HeartbeatAll(), subj.BackupDone(), subj.MsgIn()} {
		if _, err := nc.ChanSubscribe(s, echoes); err != nil {
			t.Fatal(err)
		}
	}
	forgeries := []struct{ what, subject, body string }{
		{"the attacker's QR code", subj.Conn(bus.ConnQR), `{"session":"x","at":"2026-01-01T00:00:00Z","kind":"qr","code":"2@attacker-device"}`},
		{"a heartbeat from the year 2100", subj.Heartbeat(bus.ServiceGateway), `{"session":"x","at":"2100-01-01T00:00:00Z","service":"gateway","instance":"forged","state":"connected"}`},
		{"a lease loss", subj.Conn(bus.ConnStandby), ``},
		{"a restore request", subj.SessionRestoreFor("any-instance"), `{}`},
	}
	for _, fg := range forgeries {
		if err := nc.Publish(fg.subject, []byte(fg.body)); err != nil {
			t.Fatal(err)
		}
	}
	// To answer the restore request in backup's place, a bot must hear it.
	if _, err := nc.Subscribe(subj.SessionRestoreFor("*"), func(m *nats.Msg) { _ = m.Respond([]byte(`{"ok":true}`)) }); err != nil {
		t.Fatal(err)
	}
	// A request whose reply subject is an event subject: our services
	// answer inboxes only, never there. Backup must be serving first (a
	// request nobody serves gets the server's own "no responders" there).
	waitFor(t, time.Minute, "backup to answer the bot's backup.request", func() bool {
		_, err := nc.Request(subj.BackupRequest(), nil, time.Minute)
		return !errors.Is(err, nats.ErrNoResponders)
	})
	forgedReplies := []struct{ request, reply, body string }{
		{subj.BackupRequest(), subj.Conn(bus.ConnStandby), `{"reason":"not a reason"}`},
		{subj.MsgSend(), subj.Conn(bus.ConnStandby), `not json`},
		{subj.BackupRequest(), subj.Conn(bus.ConnConnected), `{}`},
		{subj.BackupRequest(), subj.BackupDone(), `{}`},
		{subj.MsgSend(), subj.MsgIn(), `{"to":"15551234567","text":"hi"}`},
	}
	for _, fr := range forgedReplies {
		if err := nc.PublishRequest(fr.request, fr.reply, []byte(fr.body)); err != nil {
			t.Fatal(err)
		}
	}
	// The bot's own backup request is answered, in its inbox, once the
	// snapshot covering the forged ones is committed.
	if reply, err := nc.Request(subj.BackupRequest(), nil, time.Minute); err != nil || !strings.Contains(string(reply.Data), `"ok":true`) {
		t.Fatalf("backup.request as a bot: %v, %v", reply, err)
	}
	// What the bot may do still works, and its reply comes after every
	// forgery has been routed (one connection, in order).
	reply, err := nc.Request(subj.MsgSend(), []byte(`{"to":"15551234567","text":"hi"}`), 10*time.Second)
	if err != nil || !strings.Contains(string(reply.Data), `"ok":false`) {
		t.Fatalf("msg.send as a bot: %v, %v", reply, err)
	}
	for {
		select {
		case m := <-echoes:
			if strings.Contains(string(m.Data), "attacker") || strings.Contains(string(m.Data), "forged") || m.Subject == subj.Conn(bus.ConnStandby) ||
				strings.Contains(string(m.Data), `"ok":`) {
				t.Errorf("a forgery went through: %s %s", m.Subject, m.Data)
			}
			continue
		default:
		}
		break
	}
	want := []string{
		`Publish to "` + subj.Conn(bus.ConnQR) + `"`,
		`Publish to "` + subj.Heartbeat(bus.ServiceGateway) + `"`,
		`Publish to "` + subj.Conn(bus.ConnStandby) + `"`,
		`Publish to "` + subj.SessionRestoreFor("any-instance") + `"`,
		`Subscription to "` + subj.SessionRestoreFor("*") + `"`,
	}
	waitFor(t, 10*time.Second, "a permissions violation for each forgery", func() bool {
		mu.Lock()
		defer mu.Unlock()
		all := strings.Join(refused, "\n")
		for _, w := range want {
			if !strings.Contains(all, w) {
				return false
			}
		}
		return true
	})

	// The dyno is unmoved: no forged instance in /status, the gateway is
	// not in standby.
	d, code, err := getStatus("http://127.0.0.1:"+strconv.Itoa(port)+"/status", generated["HEALTH_TOKEN"])
	if err != nil || code != http.StatusOK {
		t.Fatalf("/status: %d %v", code, err)
	}
	if g := d.Services["gateway"]; g.Instance == "forged" || g.State == bus.StateStandby {
		t.Fatalf("/status gateway = %+v after the forgeries", g)
	}
	// WhatsApp cannot be reached here: a forged conn.connected would make
	// /readyz answer 200.
	if resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/readyz"); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode == http.StatusOK {
		t.Fatal("/readyz answers 200 while the dial to WhatsApp fails")
	}
	web.stop(t, 30*time.Second)
	checkLogs(t, []string{token, generated["HEALTH_TOKEN"], generated["SESSION_ENCRYPTION_KEY"], generated["NATS_INTERNAL_SECRET"]}, web)
	if _, err := bus.ReadBusFile(disk); err == nil {
		t.Fatal("bus.json is still there after a clean exit")
	}
}
