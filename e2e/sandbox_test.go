package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"database/sql"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// sandboxEnv is `blacksky run` in sandbox mode, its bus on a loopback port
// so the test (and `blacksky sandbox`) can reach it.
func sandboxEnv(t *testing.T, dataDir, dbURL string) env {
	t.Helper()
	e := env{
		"WHATSAPP_SANDBOX": "true", "SANDBOX_SEED": "e2e", "SESSION_ID": "E2E-Sandbox",
		"DATA_DIR": dataDir, "PORT": strconv.Itoa(freePort(t)),
		"NATS_LISTEN": "127.0.0.1:" + strconv.Itoa(freePort(t)), "NATS_TOKEN": randomHex(t, 16),
		"HEALTH_TOKEN": randomHex(t, 16), "SESSION_ENCRYPTION_KEY": randomHex(t, 32),
		"RECONNECT_MIN": "100ms", "RECONNECT_MAX": "400ms", "SEND_RATE": "100/s", "SHUTDOWN_TIMEOUT": "20s",
	}
	if dbURL != "" {
		e["DATABASE_URL"] = dbURL
	} else {
		e["ENABLE_SESSION_BACKUP"] = "false"
	}
	return e
}

// sandboxWatch is the test's own connection to a running process's bus and
// everything published under the session's prefix.
type sandboxWatch struct {
	t    *testing.T
	nc   *nats.Conn
	subj bus.Subjects
	mu   sync.Mutex
	msgs []*nats.Msg
	seen int // conn events consumed by next
}

func watchSandbox(t *testing.T, e env, p *proc) *sandboxWatch {
	t.Helper()
	w := &sandboxWatch{t: t, subj: bus.NewSubjects(e["SESSION_ID"])}
	waitFor(t, 20*time.Second, "the bus of "+p.name, func() bool {
		if !p.running() {
			t.Fatalf("%s exited: %v", p.name, p.err)
		}
		nc, err := bus.Connect("nats://"+e["NATS_LISTEN"], e["NATS_TOKEN"], "e2e", logging.Discard())
		if err != nil {
			return false
		}
		if !nc.IsConnected() {
			nc.Close()
			return false
		}
		w.nc = nc
		return true
	})
	t.Cleanup(w.nc.Close)
	for _, s := range []string{w.subj.ConnAll(), w.subj.MsgIn(), w.subj.SandboxOut()} {
		if _, err := w.nc.Subscribe(s, func(m *nats.Msg) {
			w.mu.Lock()
			w.msgs = append(w.msgs, m)
			w.mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *sandboxWatch) conns() []bus.ConnEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []bus.ConnEvent
	for _, m := range w.msgs {
		if strings.Contains(m.Subject, ".conn.") {
			var e bus.ConnEvent
			_ = json.Unmarshal(m.Data, &e)
			out = append(out, e)
		}
	}
	return out
}

// next waits for a connection event of kind after the last one consumed,
// skipping others (a real clock's heartbeats and retries interleave).
func (w *sandboxWatch) next(kind string) bus.ConnEvent {
	w.t.Helper()
	return w.nextWithin(kind, 30*time.Second)
}

// nextWithin is next for an event that takes longer than usual.
func (w *sandboxWatch) nextWithin(kind string, timeout time.Duration) bus.ConnEvent {
	w.t.Helper()
	var got bus.ConnEvent
	waitFor(w.t, timeout, "conn."+kind, func() bool {
		evs := w.conns()
		for i := w.seen; i < len(evs); i++ {
			if evs[i].Kind == kind {
				got, w.seen = evs[i], i+1
				return true
			}
		}
		return false
	})
	return got
}

func on[T any](w *sandboxWatch, subject string) []T {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []T
	for _, m := range w.msgs {
		if m.Subject == subject {
			var v T
			if json.Unmarshal(m.Data, &v) == nil {
				out = append(out, v)
			}
		}
	}
	return out
}

// request sends a request to subject and decodes the reply.
func (w *sandboxWatch) request(subject string, body, out any) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.Request(ctx, w.nc, subject, body, out); err != nil {
		w.t.Fatalf("request %s: %v", subject, err)
	}
}

func (w *sandboxWatch) fault(f bus.SandboxFaultRequest) {
	w.t.Helper()
	var rep bus.SandboxFaultReply
	w.request(w.subj.SandboxFault(), f, &rep)
	if !rep.OK {
		w.t.Fatalf("fault %s: %s", f.Kind, rep.Error)
	}
}

func (w *sandboxWatch) inject(in bus.SandboxInjectRequest) []string {
	w.t.Helper()
	var rep bus.SandboxInjectReply
	w.request(w.subj.SandboxInject(), in, &rep)
	if !rep.OK {
		w.t.Fatalf("inject %+v: %s", in, rep.Error)
	}
	return rep.IDs
}

// msgIn waits for the messages with ids on P.msg.in.
func (w *sandboxWatch) msgIn(ids ...string) map[string]bus.MsgIn {
	w.t.Helper()
	got := map[string]bus.MsgIn{}
	waitFor(w.t, 30*time.Second, "msg.in of "+strings.Join(ids, ","), func() bool {
		for _, m := range on[bus.MsgIn](w, w.subj.MsgIn()) {
			got[m.ID] = m
		}
		for _, id := range ids {
			if _, ok := got[id]; !ok {
				return false
			}
		}
		return true
	})
	return got
}

func (w *sandboxWatch) link() string {
	w.t.Helper()
	// The first QR code may come before this watcher subscribed: ask until
	// the sandbox has one on offer.
	var rep bus.SandboxLinkReply
	waitFor(w.t, 30*time.Second, "the sandbox to accept the link", func() bool {
		rep = bus.SandboxLinkReply{}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := bus.Request(ctx, w.nc, w.subj.SandboxLink(), bus.SandboxLinkRequest{}, &rep)
		return err == nil && rep.OK
	})
	if e := w.next(bus.ConnPaired); e.JID != rep.JID {
		w.t.Fatalf("paired as %q, linked %q", e.JID, rep.JID)
	}
	w.next(bus.ConnConnected)
	return rep.JID
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func countRows(t *testing.T, path, table string) int {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM ` + table).Scan(&n); err != nil {
		t.Fatalf("count %s in %s: %v", table, path, err)
	}
	return n
}

func httpGet(t *testing.T, url, token string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestSandboxBinary drives the shipped binary in sandbox mode: paired by
// P.sandbox.link, every message type through to P.msg.in, a send on
// P.sandbox.out, each fault producing the gateway's events, and a
// SIGTERM / empty-disk cycle that comes back linked with the store the
// sandbox wrote, restored from the database.
func TestSandboxBinary(t *testing.T) {
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	disk1 := t.TempDir()
	e := sandboxEnv(t, disk1, db.URL)
	secrets := []string{e["NATS_TOKEN"], e["HEALTH_TOKEN"], e["SESSION_ENCRYPTION_KEY"]}
	run(t, bin, e, "migrate")
	p := start(t, bin, "run (sandbox)", e, "run")
	w := watchSandbox(t, e, p)
	first := w.link()

	// Shown clearly: log, /status, /metrics.
	base := "http://127.0.0.1:" + e["PORT"]
	waitFor(t, 10*time.Second, "the start-up log to name the sandbox", func() bool {
		return strings.Contains(p.out.String(), "WHATSAPP_SANDBOX=true")
	})
	var st struct {
		Sandbox bool `json:"sandbox"`
	}
	if err := json.Unmarshal([]byte(httpGet(t, base+"/status", "")), &st); err != nil || !st.Sandbox {
		t.Errorf("/status does not say sandbox (%v)", err)
	}
	if m := httpGet(t, base+"/metrics", ""); !strings.Contains(m, "\nblacksky_sandbox 1\n") {
		t.Error("/metrics has no blacksky_sandbox 1")
	}

	// Every type the gateway maps reaches P.msg.in.
	lat, long := 48.85, 2.35
	types := map[string]bus.SandboxInjectRequest{
		"text":     {Text: "hello bot"},
		"image":    {Type: "image", Text: "caption"},
		"video":    {Type: "video", Text: "a clip"},
		"audio":    {Type: "audio"},
		"document": {Type: "document", Text: "doc", FileName: "a.pdf"},
		"sticker":  {Type: "sticker"},
		"reaction": {Type: "reaction", Text: "❤️", Target: "ABCDEF"},
		"location": {Type: "location", Latitude: &lat, Longitude: &long},
		"contact":  {Type: "contact", Text: "Bob"},
		"poll":     {Type: "poll", Text: "Tea?", Options: []string{"yes", "no"}},
		"protocol": {Type: "revoke", Target: "ABCDEF"},
	}
	want := map[string]string{}
	for typ, in := range types {
		in.From, in.Group = "4915112345678", ""
		if typ == "poll" {
			in.Group = "120363025246125486"
		}
		want[w.inject(in)[0]] = typ
	}
	var ids []string
	for id := range want {
		ids = append(ids, id)
	}
	// What each type carries on msg.in (docs/sandbox.md's table).
	wantText := map[string]string{
		"text": "hello bot", "image": "caption", "video": "a clip", "audio": "", "document": "doc", "sticker": "",
		"reaction": "❤️", "location": "", "contact": "", "poll": "Tea?", "protocol": "",
	}
	for id, m := range w.msgIn(ids...) {
		typ := want[id]
		wantChat := "4915112345678@s.whatsapp.net"
		if typ == "poll" {
			wantChat = "120363025246125486@g.us"
		}
		if m.Type != typ || m.Text != wantText[typ] || m.Chat != wantChat || m.Sender != "4915112345678@s.whatsapp.net" {
			t.Errorf("message %s: msg.in %q %q in %s from %s, want %q %q in %s from 4915112345678@s.whatsapp.net",
				id, m.Type, m.Text, m.Chat, m.Sender, typ, wantText[typ], wantChat)
		}
	}
	// The command line reaches the same process.
	cli := run(t, bin, e, "sandbox", "inject", "--from", "4915199999999", "--text", "from the cli", "--count", "3")
	var rep bus.SandboxInjectReply
	if err := json.Unmarshal([]byte(cli), &rep); err != nil || rep.Count != 3 {
		t.Fatalf("blacksky sandbox inject: %q (%v)", cli, err)
	}
	w.msgIn(rep.IDs...)

	// A send reaches P.sandbox.out, with its content.
	var sent bus.MsgSendReply
	w.request(w.subj.MsgSend(), bus.MsgSend{To: "4915112345678", Text: "hi from the bot"}, &sent)
	if !sent.OK {
		t.Fatalf("msg.send: %s", sent.Error)
	}
	waitFor(t, 10*time.Second, "sandbox.out", func() bool {
		for _, o := range on[bus.SandboxSent](w, w.subj.SandboxOut()) {
			if o.ID == sent.ID && o.Text == "hi from the bot" && o.To == "4915112345678@s.whatsapp.net" {
				return true
			}
		}
		return false
	})
	if out := run(t, bin, e, "sandbox", "outbox"); !strings.Contains(out, "hi from the bot") {
		t.Errorf("blacksky sandbox outbox: %s", out)
	}

	// Faults, each with the events the gateway's policy gives.
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	w.next(bus.ConnDisconnected)
	w.next(bus.ConnReconnecting)
	w.next(bus.ConnConnected)
	// A connect failure answers the next login: a 500 only closes the
	// socket (as whatsmeow, no connect_failure event), another reason is
	// connect_failure.
	w.fault(bus.SandboxFaultRequest{Kind: "connect_failure", Code: 500})
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	w.next(bus.ConnDisconnected)
	w.next(bus.ConnConnecting)
	w.next(bus.ConnDisconnected)
	w.next(bus.ConnReconnecting)
	w.next(bus.ConnConnected)
	w.fault(bus.SandboxFaultRequest{Kind: "connect_failure", Code: 409, Message: "try later"})
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	if e := w.next(bus.ConnConnectFailure); e.Reason != "409: client user agent was rejected (try later)" {
		t.Errorf("connect_failure reason %q", e.Reason)
	}
	w.next(bus.ConnReconnecting)
	w.next(bus.ConnConnected)
	// As whatsmeow's keepalive loop: the first ping after the fault (20 to
	// 30 s after the last answered one) times out 10 s later; an outage of
	// over 30 s is sure to meet a ping, and the first ping after it ends
	// (at most 75 s after the fault) is answered.
	w.fault(bus.SandboxFaultRequest{Kind: "keepalive_timeout", Duration: "31s"})
	w.nextWithin(bus.ConnKeepaliveTimeout, 45*time.Second)
	w.nextWithin(bus.ConnKeepaliveRestored, 80*time.Second)
	w.fault(bus.SandboxFaultRequest{Kind: "dial_hang"})
	w.next(bus.ConnDisconnected)
	w.next(bus.ConnReconnecting)
	w.next(bus.ConnConnecting)
	run(t, bin, e, "sandbox", "fault", "release")
	w.next(bus.ConnReconnecting)
	w.next(bus.ConnConnected)
	// A ban answers the next login (and every one while it lasts), with its
	// expiry in whole seconds as whatsmeow reads it.
	w.fault(bus.SandboxFaultRequest{Kind: "temporary_ban", Code: 101, Expire: "5s"})
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	w.next(bus.ConnDisconnected)
	ban := w.next(bus.ConnTemporaryBan)
	if ban.Code != "101" || ban.ExpiresAt == nil {
		t.Errorf("temporary_ban %+v", ban)
	}
	if r := w.next(bus.ConnReconnecting); r.DelayMS%1000 != 0 || r.DelayMS < 1000 || r.DelayMS > 5000 {
		t.Errorf("reconnect after the ban in %d ms, want the whole seconds left of 5 s", r.DelayMS)
	}
	w.next(bus.ConnConnected)
	w.fault(bus.SandboxFaultRequest{Kind: "logged_out"})
	w.next(bus.ConnLoggedOut)
	w.next(bus.ConnReconnecting)
	jid := w.link() // a fresh device, linked again
	if jid == first {
		t.Errorf("linked again as the same device %s", jid)
	}
	grown := filepath.Join(disk1, "session.db")
	ids = w.inject(bus.SandboxInjectRequest{From: "4915100000001", Text: "after relink", Count: 5})
	w.msgIn(ids...)
	w.fault(bus.SandboxFaultRequest{Kind: "stream_replaced"})
	w.next(bus.ConnStreamReplaced)
	if r := w.next(bus.ConnReconnecting); r.DelayMS != (10 * time.Minute).Milliseconds() {
		t.Errorf("reconnect after stream replaced in %d ms, want 10 min", r.DelayMS)
	}

	took := p.stop(t, 30*time.Second)
	t.Logf("stopped %s after SIGTERM", took.Round(time.Millisecond))
	sessions := countRows(t, grown, "whatsmeow_sessions")
	if sessions == 0 || countRows(t, grown, "whatsmeow_identity_keys") == 0 {
		t.Fatalf("the sandbox left no session or identity rows in %s", grown)
	}
	checkLogs(t, secrets, p)
	// The shutdown backup stores the final store, unless an earlier point
	// (continuous replication, or the paired one) already holds exactly
	// that store: an unchanged store is not stored again.
	checkShutdownRow(t, snapshots(t, db.URL, e["SESSION_ID"]), p, grown)

	// An empty disk (no session.db, no sandbox.db): restored from the
	// database, back linked as before, without a QR code.
	disk2 := t.TempDir()
	e2 := e.with("DATA_DIR", disk2, "PORT", strconv.Itoa(freePort(t)), "NATS_LISTEN", "127.0.0.1:"+strconv.Itoa(freePort(t)))
	p2 := start(t, bin, "run (sandbox, empty disk)", e2, "run")
	w2 := watchSandbox(t, e2, p2)
	// The connect may come before the watcher subscribed: ask /status.
	waitState(t, p2, mustAtoi(t, e2["PORT"]), e2["HEALTH_TOKEN"], func(g, _ string) bool { return g == bus.StateConnected })
	if got := deviceJID(t, filepath.Join(disk2, "session.db")); got != jid {
		t.Fatalf("after the empty-disk restart the store holds %q, want %q", got, jid)
	}
	for _, c := range w2.conns() {
		if c.Kind == bus.ConnQR {
			t.Error("the restored gateway offered a QR code")
		}
	}
	restored := filepath.Join(disk2, "session.db")
	if got := countRows(t, restored, "whatsmeow_sessions"); got != sessions {
		t.Errorf("restored store has %d session rows, the sandbox wrote %d", got, sessions)
	}
	ids = w2.inject(bus.SandboxInjectRequest{From: "4915100000002", Text: "after the restore"})
	w2.msgIn(ids...)
	// client_outdated answers the next login; the gateway takes the newer
	// version the sandbox serves (no request leaves the process) and logs in.
	w2.fault(bus.SandboxFaultRequest{Kind: "client_outdated"})
	w2.fault(bus.SandboxFaultRequest{Kind: "disconnect"})
	w2.next(bus.ConnClientOutdated)
	w2.next(bus.ConnConnected)
	if !strings.Contains(p2.out.String(), "now presenting WhatsApp's current web version") {
		t.Error("the gateway did not switch to the version the sandbox serves")
	}
	p2.stop(t, 30*time.Second)
	checkLogs(t, secrets, p2)
}

// TestSandboxRedeliversAfterSIGKILL: messages injected (committed to
// sandbox.db) but not delivered when the process is killed arrive on
// P.msg.in after the restart.
func TestSandboxRedeliversAfterSIGKILL(t *testing.T) {
	bin := buildBinary(t)
	disk := t.TempDir()
	e := sandboxEnv(t, disk, "")
	p := start(t, bin, "run (sandbox)", e, "run")
	w := watchSandbox(t, e, p)
	jid := w.link()
	// A ban (kept in the server file) holds the messages back, in this
	// process and for a few seconds after the restart: time for the test to
	// listen before they are delivered.
	w.fault(bus.SandboxFaultRequest{Kind: "temporary_ban", Expire: "10s"})
	w.fault(bus.SandboxFaultRequest{Kind: "disconnect"}) // the next login meets the ban
	w.next(bus.ConnTemporaryBan)
	ids := w.inject(bus.SandboxInjectRequest{From: "4915100000003", Text: "queued", Count: 4})
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	for _, name := range []string{"sandbox.db", "session.db"} {
		if fi, err := os.Stat(filepath.Join(disk, name)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v (mode %v), want 0600", name, err, fi.Mode())
		}
	}

	p2 := start(t, bin, "run (sandbox, after SIGKILL)", e, "run")
	w2 := watchSandbox(t, e, p2)
	w2.msgIn(ids...)
	if c := w2.next(bus.ConnConnected); c.JID != jid {
		t.Fatalf("after SIGKILL connected as %q, want %q", c.JID, jid)
	}
	testwait.Every(t, 10*time.Second, 100*time.Millisecond, "the outbox answering", func() bool {
		_, _, code := runCode(t, bin, e, "sandbox", "outbox")
		return code == 0
	})
	p2.stop(t, 30*time.Second)
}
