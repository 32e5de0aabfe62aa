package bus_test

import (
	"errors"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

const (
	testToken  = "bots-token-for-the-table-test"
	testSecret = "internal-secret-for-the-table-test"
)

// contractSubjects reads every subject of CONTRACT section 3, with <kind>
// and <service> expanded, relative to the prefix P.
func contractSubjects(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("../../CONTRACT.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	start := strings.Index(text, "## 3. NATS subjects")
	if start < 0 {
		t.Fatal("CONTRACT.md has no section 3. NATS subjects")
	}
	section := text[start:]
	if end := strings.Index(section[3:], "\n## "); end >= 0 {
		section = section[:end+3]
	}
	var out []string
	row := regexp.MustCompile("(?m)^\\| `P\\.([a-z0-9_.<>-]+)`")
	for _, m := range row.FindAllStringSubmatch(section, -1) {
		subj := m[1]
		switch {
		case strings.Contains(subj, "<kind>"):
			for _, k := range bus.ConnKinds {
				out = append(out, strings.Replace(subj, "<kind>", k, 1))
			}
		case strings.Contains(subj, "<instance>"):
			out = append(out, strings.Replace(subj, "<instance>", "web-1-0a1b2c3d", 1))
		case strings.Contains(subj, "<service>"):
			for _, s := range []string{bus.ServiceGateway, bus.ServiceBackup, bus.ServiceHealth, bus.ServiceRelay} {
				out = append(out, strings.Replace(subj, "<service>", s, 1))
			}
		default:
			out = append(out, subj)
		}
	}
	if len(out) < 10 {
		t.Fatalf("found only %d subjects in CONTRACT.md section 3: %q", len(out), out)
	}
	return out
}

// Who may publish each subject, written out independently of roles.go.
// Subjects are relative to P. In sandbox mode the bots may also publish
// the sandbox's control subjects.
var wantPublish = map[string][]bus.Role{
	"heartbeat.gateway": {bus.RoleGateway},
	"heartbeat.backup":  {bus.RoleBackup},
	"heartbeat.health":  {bus.RoleHealth},
	"heartbeat.relay":   {bus.RoleRelay},
	"backup.request":    {bus.RoleGateway, bus.RoleBot},
	"backup.done":       {bus.RoleBackup},
	"backup.failed":     {bus.RoleBackup},
	"session.restore":   {bus.RoleGateway},
	"msg.in":            {bus.RoleRelay},
	"msg.send":          {bus.RoleBot},
	"msg.receipt":       {bus.RoleRelay},
	"msg.sent":          {bus.RoleRelay},
	"msg.send_failed":   {bus.RoleRelay},
	"msg.replay":        {bus.RoleBot},
	"relay.retry":       {bus.RoleBot},
	"gateway.send":      {bus.RoleRelay},
	"relay.store":       {bus.RoleGateway},
	"sandbox.link":      {bus.RoleHealth}, // /pair's "link now" button
	"sandbox.inject":    {},
	"sandbox.fault":     {},
	"sandbox.receipt":   {},
	"sandbox.outbox":    {},
	"sandbox.out":       {bus.RoleGateway},
}

var sandboxCommands = []string{"sandbox.link", "sandbox.inject", "sandbox.fault", "sandbox.receipt", "sandbox.outbox"}

func mayPublish(role bus.Role, subj string, sandbox bool) bool {
	if strings.HasPrefix(subj, "conn.") {
		// The gateway reports the connection; backup says standby when
		// another instance holds the session.
		return role == bus.RoleGateway || role == bus.RoleBackup && subj == "conn.standby"
	}
	if strings.HasPrefix(subj, "session.restore.") { // scoped to an instance
		subj = "session.restore"
	}
	if sandbox && role == bus.RoleBot && slices.Contains(sandboxCommands, subj) {
		return true
	}
	roles, ok := wantPublish[subj]
	if !ok {
		panic("no expectation for " + subj)
	}
	return slices.Contains(roles, role)
}

// maySubscribe: our services listen to everything; bots to events only,
// never to a subject our services answer (they could answer in their place).
func maySubscribe(role bus.Role, subj string) bool {
	if role != bus.RoleBot {
		return true
	}
	switch {
	case strings.HasPrefix(subj, "conn."), strings.HasPrefix(subj, "heartbeat."):
		return true
	}
	return slices.Contains([]string{"backup.done", "backup.failed", "msg.in", "sandbox.out", "msg.receipt", "msg.sent", "msg.send_failed"}, subj)
}

func tableSubjects(t *testing.T) []string {
	subjects := contractSubjects(t)
	for _, s := range subjects {
		if _, ok := wantPublish[s]; !ok && !strings.HasPrefix(s, "conn.") && !strings.HasPrefix(s, "session.restore.") {
			t.Fatalf("CONTRACT.md lists P.%s, which has no line in this test: say who may publish and subscribe it "+
				"here and in shared/bus/roles.go", s)
		}
	}
	// Subjects not (or no longer) in the contract are checked too.
	for s := range wantPublish {
		if !slices.Contains(subjects, s) {
			subjects = append(subjects, s)
		}
	}
	if !slices.Contains(subjects, "session.restore.web-1-0a1b2c3d") {
		subjects = append(subjects, "session.restore.web-1-0a1b2c3d")
	}
	slices.Sort(subjects)
	return subjects
}

func credentials() map[bus.Role]bus.Credential {
	return map[bus.Role]bus.Credential{
		bus.RoleGateway: bus.RoleCredential(bus.RoleGateway, testSecret),
		bus.RoleBackup:  bus.RoleCredential(bus.RoleBackup, testSecret),
		bus.RoleHealth:  bus.RoleCredential(bus.RoleHealth, testSecret),
		bus.RoleRelay:   bus.RoleCredential(bus.RoleRelay, testSecret),
		bus.RoleBot:     bus.BotCredential(testToken),
	}
}

// checkTable connects to url with every credential and checks every subject
// both ways against the expectations, by delivery: an observer with full
// rights sees what each credential publishes, and publishes what each
// credential subscribes to.
func checkTable(t *testing.T, url string, observer *nats.Conn, sandbox bool) {
	subjects := tableSubjects(t)
	const session = "blacksky.table-session."
	seen := make(chan *nats.Msg, 4096)
	if _, err := observer.ChanSubscribe("blacksky.>", seen); err != nil {
		t.Fatal(err)
	}
	if err := observer.Flush(); err != nil {
		t.Fatal(err)
	}
	for role, cred := range credentials() {
		t.Run(string(role), func(t *testing.T) {
			violations := make(chan error, 256)
			nc, err := bus.Dial(url, cred, "table-"+string(role), 5*time.Second, logging.Discard(),
				nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { violations <- err }))
			if err != nil {
				t.Fatalf("connect as %s: %v", role, err)
			}
			defer nc.Close()

			// Publish: the observer receives exactly the allowed ones.
			for _, s := range subjects {
				if err := nc.Publish(session+s, []byte(string(role))); err != nil {
					t.Fatal(err)
				}
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := observer.Flush(); err != nil {
				t.Fatal(err)
			}
			got := map[string]bool{}
		drain:
			for {
				select {
				case m := <-seen:
					if string(m.Data) == string(role) {
						got[strings.TrimPrefix(m.Subject, session)] = true
					}
				default:
					break drain
				}
			}
			for _, s := range subjects {
				if want := mayPublish(role, s, sandbox); got[s] != want {
					t.Errorf("%s publishing P.%s: delivered=%v, want %v", role, s, got[s], want)
				}
			}

			// Subscribe: the credential receives exactly the allowed ones.
			in := make(chan *nats.Msg, 4096)
			for _, s := range subjects {
				if _, err := nc.ChanSubscribe(session+s, in); err != nil {
					t.Fatal(err)
				}
			}
			// Inboxes: each credential reads replies only where its own
			// requests are answered; a bot never reads our services'.
			inboxes := map[string]bool{
				bus.InboxPrefix + "table." + string(role):        role == bus.RoleBot,
				bus.ServiceInboxPrefix + "table." + string(role): role != bus.RoleBot,
			}
			for s := range inboxes {
				if _, err := nc.ChanSubscribe(s, in); err != nil {
					t.Fatal(err)
				}
			}
			done := nc.NewRespInbox()
			if _, err := nc.ChanSubscribe(done, in); err != nil {
				t.Fatal(err)
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			for _, s := range subjects {
				if err := observer.Publish(session+s, []byte("to-"+string(role))); err != nil {
					t.Fatal(err)
				}
			}
			for s := range inboxes {
				if err := observer.Publish(s, []byte("to-"+string(role))); err != nil {
					t.Fatal(err)
				}
			}
			if err := observer.Publish(done, nil); err != nil {
				t.Fatal(err)
			}
			received := map[string]bool{}
			timeout := time.After(10 * time.Second)
		wait:
			for {
				select {
				case m := <-in:
					if m.Subject == done {
						break wait
					}
					received[strings.TrimPrefix(m.Subject, session)] = true
				case <-timeout:
					t.Fatal("the end marker did not arrive")
				}
			}
			for _, s := range subjects {
				if want := maySubscribe(role, s); received[s] != want {
					t.Errorf("%s subscribing P.%s: received=%v, want %v", role, s, received[s], want)
				}
			}
			for s, want := range inboxes {
				if received[s] != want {
					t.Errorf("%s subscribing %s: received=%v, want %v", role, s, received[s], want)
				}
			}
			// Refusals are also reported to the client as permissions
			// violations (asynchronously), not silently dropped.
			select {
			case err := <-violations:
				if !errors.Is(err, nats.ErrPermissionViolation) {
					t.Errorf("%s: async error %v, want permission violations only", role, err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("%s: no permissions violation reported", role)
			}
		})
	}

	t.Run("none", func(t *testing.T) {
		for name, cred := range map[string]bus.Credential{
			"no credential":          {},
			"wrong token":            {Token: "not-the-token"},
			"role with bots' token":  bus.RoleCredential(bus.RoleGateway, testToken),
			"unknown user":           {User: "admin", Password: testSecret},
			"bot user, wrong secret": {User: "bot", Password: testSecret},
		} {
			nc, err := bus.Dial(url, cred, "table-none", 5*time.Second, logging.Discard())
			if err == nil {
				nc.Close()
				t.Errorf("%s: connected, want refused", name)
			} else if !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
				t.Errorf("%s: %v, want an authorization violation", name, err)
			}
		}
	})
}

// TestBusPermissionTable is every subject of CONTRACT.md against every
// credential on the real embedded server, over TCP.
func TestBusPermissionTable(t *testing.T) {
	for _, sandbox := range []bool{false, true} {
		t.Run(map[bool]string{false: "normal", true: "sandbox"}[sandbox], func(t *testing.T) {
			srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: testToken,
				InternalSecret: testSecret, Sandbox: sandbox})
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Shutdown()
			observer, err := srv.Connect("observer", logging.Discard())
			if err != nil {
				t.Fatal(err)
			}
			defer observer.Close()
			checkTable(t, srv.ClientURL(), observer, sandbox)
		})
	}
}

// TestSampleServerConfig starts nats-server from deploy/nats-server.conf, as
// an operator of an external NATS_URL would, and checks the same table.
func TestSampleServerConfig(t *testing.T) {
	t.Setenv("NATS_TOKEN", testToken)
	t.Setenv("NATS_INTERNAL_SECRET", testSecret)
	const observerPassword = "observer-password-for-this-test"
	opts, err := server.ProcessConfigFile("../../deploy/nats-server.conf")
	if err != nil {
		t.Fatalf("nats-server refuses deploy/nats-server.conf: %v", err)
	}
	opts.Host, opts.Port = "127.0.0.1", -1 // a system NATS server holds 4222 here
	opts.NoLog, opts.NoSigs = true, true
	// The observer is this test's own, added beside the file's users.
	opts.Users = append(opts.Users, &server.User{Username: "observer", Password: observerPassword})
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	observer, err := bus.Dial(ns.ClientURL(), bus.Credential{User: "observer", Password: observerPassword}, "observer", 5*time.Second, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	checkTable(t, ns.ClientURL(), observer, false)
}

// TestOnlyServicesAnswerRequests: a request is answered by the service that
// owns the subject; a role without the right to respond cannot answer, even
// though it hears the request.
func TestOnlyServicesAnswerRequests(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: testToken, InternalSecret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	conn := func(role bus.Role) *nats.Conn {
		nc, err := srv.ConnectAs(role, string(role), logging.Discard())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	gateway, health, bot := conn(bus.RoleGateway), conn(bus.RoleHealth), conn(bus.RoleBot)
	subj := bus.NewSubjects("answers")

	// health hears session.restore but may not answer it: the gateway's
	// request gets no reply.
	if _, err := health.Subscribe(subj.SessionRestoreFor("i1"), func(m *nats.Msg) { _ = m.Respond([]byte(`{"ok":true}`)) }); err != nil {
		t.Fatal(err)
	}
	if err := health.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := gateway.Request(subj.SessionRestoreFor("i1"), nil, 500*time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("restore request answered by health: err = %v, want a timeout", err)
	}

	// Backup answers the gateway's restore request in the services'
	// inbox, which no bot can read.
	backup := conn(bus.RoleBackup)
	replyTo := make(chan string, 1)
	if _, err := backup.Subscribe(subj.SessionRestoreFor("i1"), func(m *nats.Msg) {
		replyTo <- m.Reply
		_ = bus.Respond(m, bus.RestoreReply{OK: true})
	}); err != nil {
		t.Fatal(err)
	}
	if err := backup.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := gateway.Request(subj.SessionRestoreFor("i1"), nil, 5*time.Second); err != nil {
		t.Fatalf("gateway's restore request: %v", err)
	}
	if r := <-replyTo; !strings.HasPrefix(r, bus.ServiceInboxPrefix) {
		t.Fatalf("the gateway's request asks for its reply on %q, want the services' inbox %s", r, bus.ServiceInboxPrefix)
	}

	// Relay answers a bot's msg.send and the gateway's relay.store; the
	// gateway answers relay's gateway.send.
	relay := conn(bus.RoleRelay)
	for _, s := range []string{subj.MsgSend(), subj.RelayStore()} {
		if _, err := relay.Subscribe(s, func(m *nats.Msg) { _ = bus.Respond(m, bus.RelayStoreReply{OK: true}) }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := gateway.Subscribe(subj.GatewaySend(), func(m *nats.Msg) { _ = bus.Respond(m, bus.MsgSendReply{OK: true}) }); err != nil {
		t.Fatal(err)
	}
	for _, nc := range []*nats.Conn{relay, gateway} {
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name    string
		nc      *nats.Conn
		subject string
	}{
		{"bot's msg.send", bot, subj.MsgSend()},
		{"gateway's relay.store", gateway, subj.RelayStore()},
		{"relay's gateway.send", relay, subj.GatewaySend()},
	} {
		reply, err := c.nc.Request(c.subject, []byte(`{}`), 5*time.Second)
		if err != nil || string(reply.Data) != `{"ok":true}` {
			t.Fatalf("%s: %v, %v", c.name, reply, err)
		}
	}
	// A bot can neither store a message nor send past relay's queue: its
	// requests never reach the services.
	for _, s := range []string{subj.RelayStore(), subj.GatewaySend()} {
		if _, err := bot.Request(s, []byte(`{}`), 500*time.Millisecond); err == nil {
			t.Fatalf("a bot's request on %s was answered", s)
		}
	}
}

// TestRefusedServiceCredentialIsLogged: a service whose secret differs from
// the bus's keeps retrying (split processes start in any order) and says
// at once why it cannot join.
func TestRefusedServiceCredentialIsLogged(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: testToken, InternalSecret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	var logs testlog.Buffer
	log := logs.Logger()
	nc, err := bus.ConnectWith(srv.ClientURL(), bus.RoleCredential(bus.RoleBackup, "another-secret-of-16+"), "backup", log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	testwait.For(t, 10*time.Second, "the refusal in the log", func() bool {
		return strings.Contains(logs.String(), "refuses this process's credential")
	})
	if nc.IsConnected() {
		t.Fatal("connected with a wrong secret")
	}
}

// TestRequestWithEventReplySubjectIsNotAnsweredThere: nats-server lets a
// responder publish once to a request's reply subject whatever its publish
// permissions, so a bot naming an event subject as its reply would make our
// service publish that event. bus.Respond answers inboxes only.
func TestRequestWithEventReplySubjectIsNotAnsweredThere(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{Listen: "127.0.0.1:0", Token: testToken, InternalSecret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	subj := bus.NewSubjects("replies")
	responders := map[bus.Role]string{bus.RoleGateway: subj.MsgSend(), bus.RoleBackup: subj.BackupRequest()}
	for role, s := range responders {
		nc, err := srv.ConnectAs(role, string(role), logging.Discard())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		if _, err := nc.Subscribe(s, func(m *nats.Msg) { _ = bus.Respond(m, bus.BackupReply{OK: true}) }); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	observer, err := srv.Connect("observer", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	seen := make(chan *nats.Msg, 64)
	if _, err := observer.ChanSubscribe("blacksky.>", seen); err != nil {
		t.Fatal(err)
	}
	if err := observer.Flush(); err != nil {
		t.Fatal(err)
	}
	bot, err := srv.ConnectAs(bus.RoleBot, "bot", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer bot.Close()
	events := []string{subj.Conn(bus.ConnStandby), subj.Conn(bus.ConnConnected), subj.BackupDone(), subj.MsgIn()}
	for _, request := range responders {
		for _, ev := range events {
			if err := bot.PublishRequest(request, ev, []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
		}
		// A real request on the same connection comes after the forged
		// ones: once it is answered, they were handled.
		if _, err := bot.Request(request, []byte(`{}`), 5*time.Second); err != nil {
			t.Fatalf("a bot's own request on %s: %v", request, err)
		}
	}
	if err := observer.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-seen:
			if slices.Contains(events, m.Subject) {
				t.Errorf("a service answered on the event subject %s: %s", m.Subject, m.Data)
			}
			continue
		default:
		}
		break
	}
}
