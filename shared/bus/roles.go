package bus

import (
	"crypto/subtle"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Role names a credential on the bus. Each of our services connects as its
// own role and may publish only the subjects it owns; outside programs (the
// bots operators write) connect with NATS_TOKEN as RoleBot. The table below
// is the only definition: the embedded server's users and the sample
// nats-server configuration for an external NATS_URL are both built from it.
type Role string

const (
	RoleGateway Role = ServiceGateway
	RoleBackup  Role = ServiceBackup
	RoleHealth  Role = ServiceHealth
	RoleRelay   Role = ServiceRelay
	// RoleBot is the credential operators hand to their bots: NATS_TOKEN.
	RoleBot Role = "bot"
)

// InternalRoles are the roles of our own services, which authenticate with
// NATS_INTERNAL_SECRET.
var InternalRoles = []Role{RoleGateway, RoleBackup, RoleHealth, RoleRelay}

// Roles is every role, internal ones first.
var Roles = append(slices.Clone(InternalRoles), RoleBot)

// ResponseWindow is how long a service may take to answer a request it
// received: a backup.request is answered once its snapshot is committed,
// which may wait out a database outage (backup's reply timeout is 2 min).
const ResponseWindow = 10 * time.Minute

// Replies go to inboxes, and Respond answers nowhere else. Bots use
// nats.go's default inbox prefix; our services use their own, which only
// internal roles may subscribe to: a bot may read the answers to its own
// requests, never the restore answer backup sends the gateway.
const (
	InboxPrefix        = "_INBOX."
	ServiceInboxPrefix = "_BSKY_INBOX."
)

const (
	inbox        = InboxPrefix + ">"
	serviceInbox = ServiceInboxPrefix + ">"
)

// isInternal reports whether role is one of our services.
func isInternal(role Role) bool { return slices.Contains(InternalRoles, role) }

// grant is what one role may do. Subjects are relative to the session
// prefix: "conn.*" means blacksky.<any session>.conn.*.
type grant struct {
	publish []string
	// sandboxPublish is added to publish in sandbox mode only
	// (WHATSAPP_SANDBOX): the stand-in's control subjects.
	sandboxPublish []string
	// subscribe nil means every subject of the bus: our services listen
	// freely, what they may say is what is restricted. Internal roles
	// also read the service inboxes, bots their own (_INBOX.>).
	subscribe []string
	// respond lets the role answer requests it received (the reply subject
	// of each, once, within ResponseWindow), and nothing else in _INBOX.
	respond bool
	// jetStream are JetStream API subjects the role may publish, as they
	// are (not under the session prefix).
	jetStream []string
}

// JetStream API subjects. A stream's name is one subject token, so a grant
// cannot say "our streams" (BLACKSKY_*) and names every stream (*): on an
// external NATS shared with other applications, bots can read those
// applications' stream infos and make consumers on their streams. Nobody
// but relay may create, change or delete a stream, or purge or delete its
// messages.
var (
	// relayJetStream: find out whether the server has JetStream, and
	// create or update the session's stream (publishing into it is a plain
	// publish on P.msg.in and the others, acked to relay's inbox).
	relayJetStream = []string{"$JS.API.INFO", "$JS.API.STREAM.CREATE.*", "$JS.API.STREAM.UPDATE.*", "$JS.API.STREAM.INFO.*"}
	// botJetStream: what a bot with a durable pull consumer needs, through
	// nats.go's jetstream package or its older JetStreamContext: look the
	// stream up, create (or update), read and delete its own consumers,
	// pull messages (answered on its _INBOX), and ack them.
	botJetStream = []string{
		"$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES",
		"$JS.API.CONSUMER.CREATE.*", "$JS.API.CONSUMER.CREATE.*.>", "$JS.API.CONSUMER.DURABLE.CREATE.*.*",
		"$JS.API.CONSUMER.INFO.*.*", "$JS.API.CONSUMER.MSG.NEXT.*.*", "$JS.API.CONSUMER.DELETE.*.*",
		"$JS.ACK.>",
	}
)

var grants = map[Role]grant{
	RoleGateway: {
		publish: []string{
			"conn.*", "heartbeat." + ServiceGateway,
			"session.restore", "session.restore.*", // request to (its own instance's) backup
			"backup.request", // the owner's .backup command
			"relay.store",    // request: every incoming message and receipt, before its ack
			"sandbox.out",    // every send the sandbox records
		},
		respond: true, // gateway.send, sandbox.* replies
	},
	RoleBackup: {
		publish: []string{"backup.done", "backup.failed", "conn." + ConnStandby, "heartbeat." + ServiceBackup},
		respond: true, // backup.request and session.restore replies
	},
	RoleRelay: {
		publish: []string{
			"msg.in", "msg.receipt", "msg.sent", "msg.send_failed", "heartbeat." + ServiceRelay,
			"gateway.send", // request: the gateway sends one queued message
		},
		respond:   true, // relay.store, msg.send, msg.replay, relay.retry replies
		jetStream: relayJetStream,
	},
	RoleHealth: {
		publish: []string{
			"heartbeat." + ServiceHealth,
			"sandbox.link", // /pair's "link now" button, in sandbox mode
		},
	},
	RoleBot: {
		publish:        []string{"msg.send", "backup.request", "msg.replay", "relay.retry"},
		sandboxPublish: []string{"sandbox.link", "sandbox.inject", "sandbox.fault", "sandbox.receipt", "sandbox.outbox"},
		// Events only: a bot that could subscribe to a command subject
		// (session.restore, msg.send) would receive the requests and could
		// answer them in place of our services.
		subscribe: []string{"conn.*", "heartbeat.*", "backup.done", "backup.failed", "msg.in", "sandbox.out",
			"msg.receipt", "msg.sent", "msg.send_failed"},
		jetStream: botJetStream,
	},
}

// sessionWildcard stands for every session's prefix.
const sessionWildcard = "blacksky.*."

// Permissions returns what role may do on the bus; sandbox adds the sandbox
// control subjects to the bots' credential.
func Permissions(role Role, sandbox bool) (*server.Permissions, error) {
	g, ok := grants[role]
	if !ok {
		return nil, fmt.Errorf("bus: unknown role %q", role)
	}
	pub := g.publish
	if sandbox {
		pub = append(slices.Clone(pub), g.sandboxPublish...)
	}
	p := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: append(prefixed(pub), g.jetStream...)},
		Subscribe: &server.SubjectPermission{Allow: []string{"blacksky.>", serviceInbox}},
	}
	if g.subscribe != nil {
		p.Subscribe.Allow = prefixed(g.subscribe)
	}
	if !isInternal(role) {
		p.Subscribe.Allow = append(p.Subscribe.Allow, inbox)
	}
	if g.respond {
		p.Response = &server.ResponsePermission{MaxMsgs: 1, Expires: ResponseWindow}
	}
	return p, nil
}

func prefixed(subjects []string) []string {
	out := make([]string, len(subjects))
	for i, s := range subjects {
		out[i] = sessionWildcard + s
	}
	return out
}

// Credential is what a client presents: a role's user name and password,
// or the bots' token.
type Credential struct {
	User     string
	Password string
	Token    string
}

// RoleCredential is the credential of one of our services.
func RoleCredential(role Role, internalSecret string) Credential {
	return Credential{User: string(role), Password: internalSecret}
}

// BotCredential is NATS_TOKEN as outside programs present it. It is sent
// both as a token (what the embedded server and a token-only server check)
// and as user "bot" with the token as password (what a nats-server
// configured from deploy/nats-server.conf checks: it cannot attach
// permissions to a bare token).
func BotCredential(token string) Credential {
	if token == "" {
		return Credential{}
	}
	return Credential{User: string(RoleBot), Password: token, Token: token}
}

// authenticator is the embedded server's check: a role's user and
// password, or the bots' token; anything else, including no credential at
// all, is refused. In-process connections are checked too.
type authenticator struct {
	users    map[string]*server.User
	botToken string
}

var _ server.Authentication = (*authenticator)(nil)

func newAuthenticator(botToken, internalSecret, trusted string, sandbox bool) (*authenticator, error) {
	a := &authenticator{users: map[string]*server.User{}, botToken: botToken}
	for _, role := range Roles {
		perms, err := Permissions(role, sandbox)
		if err != nil {
			return nil, err
		}
		pw := internalSecret
		if role == RoleBot {
			pw = botToken
		}
		if pw == "" {
			continue // no bots on an in-process-only bus
		}
		a.users[string(role)] = &server.User{Username: string(role), Password: pw, Permissions: perms}
	}
	// The in-process superuser of Server.Connect: its password never
	// leaves this process.
	a.users[trustedUser] = &server.User{Username: trustedUser, Password: trusted}
	return a, nil
}

const trustedUser = "in-process"

func (a *authenticator) Check(c server.ClientAuthentication) bool {
	o := c.GetOpts()
	var u *server.User
	switch {
	case o.Username != "":
		u = a.users[o.Username]
		if u == nil || !equal(o.Password, u.Password) {
			return false
		}
	case o.Token != "" && a.botToken != "":
		if !equal(o.Token, a.botToken) {
			return false
		}
		u = a.users[string(RoleBot)]
	default:
		return false
	}
	c.RegisterUser(u)
	return true
}

func equal(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// ServerConfig renders the authorization block of a nats-server
// configuration with the same users and permissions as the embedded
// server. Passwords are read from the server's environment: NATS_TOKEN for
// the bots, NATS_INTERNAL_SECRET for our services.
func ServerConfig(sandbox bool) (string, error) {
	var b strings.Builder
	b.WriteString("authorization {\n  users: [\n")
	for _, role := range Roles {
		p, err := Permissions(role, sandbox)
		if err != nil {
			return "", err
		}
		pw := "$NATS_INTERNAL_SECRET"
		if role == RoleBot {
			pw = "$NATS_TOKEN"
		}
		fmt.Fprintf(&b, "    {\n      user: %s\n      password: %s\n      permissions: {\n", role, pw)
		fmt.Fprintf(&b, "        publish: { allow: %s }\n", confList(p.Publish.Allow))
		fmt.Fprintf(&b, "        subscribe: { allow: %s }\n", confList(p.Subscribe.Allow))
		if p.Response != nil {
			fmt.Fprintf(&b, "        allow_responses: { max: %d, expires: %q }\n", p.Response.MaxMsgs, p.Response.Expires)
		}
		b.WriteString("      }\n    }\n")
	}
	b.WriteString("  ]\n}\n")
	return b.String(), nil
}

func confList(subjects []string) string {
	q := make([]string, len(subjects))
	for i, s := range subjects {
		q[i] = fmt.Sprintf("%q", s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
