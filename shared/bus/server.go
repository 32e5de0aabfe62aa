package bus

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// ServerOptions configure the embedded NATS server.
type ServerOptions struct {
	// Listen is host:port for other processes; empty means in-process only
	// (no TCP port at all). Port 0 or -1 picks a free port (tests).
	Listen string
	// Token is the bots' credential (NATS_TOKEN). Empty with a Listen
	// address: one is generated (see Server.BotToken). A bus on TCP never
	// accepts a client without a credential, loopback included.
	Token string
	// InternalSecret authenticates our own services' roles
	// (NATS_INTERNAL_SECRET); empty: one is generated, which only this
	// process knows.
	InternalSecret string
	// Sandbox lets the bots' credential publish the sandbox's control
	// subjects (WHATSAPP_SANDBOX).
	Sandbox bool
	// MaxPayload in bytes; 0 keeps the NATS default of 1 MB.
	MaxPayload int32
	// JetStream enables JetStream (NATS_JETSTREAM), storing in
	// JetStreamDir ($DATA_DIR/jetstream): relay then keeps each session's
	// messages in a stream that bots read with durable consumers.
	JetStream    bool
	JetStreamDir string
}

// Server is the embedded NATS server.
type Server struct {
	ns             *server.Server
	token          string
	tokenGenerated bool
	internalSecret string
	trusted        string
}

// StartServer starts the embedded server and waits until it accepts clients.
func StartServer(opts ServerOptions) (*Server, error) {
	s := &Server{token: opts.Token, internalSecret: opts.InternalSecret, trusted: randomSecret()}
	if s.token == "" && opts.Listen != "" {
		s.token, s.tokenGenerated = randomSecret(), true
	}
	if s.internalSecret == "" {
		s.internalSecret = randomSecret()
	}
	auth, err := newAuthenticator(s.token, s.internalSecret, s.trusted, opts.Sandbox)
	if err != nil {
		return nil, err
	}
	o := &server.Options{
		ServerName:                 "blacksky",
		NoSigs:                     true, // the process owns SIGTERM, not the server
		NoLog:                      true,
		CustomClientAuthentication: auth,
		MaxPayload:                 opts.MaxPayload,
		MaxPending:                 64 << 20,
	}
	if opts.JetStream {
		if opts.JetStreamDir == "" {
			return nil, errors.New("nats server: JetStream needs a storage directory")
		}
		// JetStream keeps its files owner-only, as everything in DATA_DIR.
		if err := os.MkdirAll(opts.JetStreamDir, 0o700); err != nil {
			return nil, fmt.Errorf("nats server: JetStream storage: %w", err)
		}
		o.JetStream, o.StoreDir = true, opts.JetStreamDir
	}
	if opts.Listen == "" {
		o.DontListen = true
	} else {
		host, portStr, err := net.SplitHostPort(opts.Listen)
		if err != nil {
			return nil, fmt.Errorf("nats listen %q: %w", opts.Listen, err)
		}
		port, err := strconv.Atoi(portStr)
		if err != nil {
			return nil, fmt.Errorf("nats listen %q: bad port", opts.Listen)
		}
		if port == 0 {
			port = server.RANDOM_PORT
		}
		o.Host, o.Port = host, port
		// nats-server only logs a failed bind and never becomes ready; a
		// bind of our own names the cause at once.
		if port != server.RANDOM_PORT {
			ln, err := net.Listen("tcp", opts.Listen)
			if err != nil {
				return nil, &ListenError{Addr: opts.Listen, Err: err}
			}
			ln.Close()
		}
	}
	ns, err := server.NewServer(o)
	if err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		if opts.Listen != "" {
			return nil, &ListenError{Addr: opts.Listen, Err: errors.New("the embedded NATS server did not start listening within 10s (is the port taken?)")}
		}
		return nil, errors.New("nats server: not ready after 10s")
	}
	s.ns = ns
	return s, nil
}

// ListenError is a listen address the embedded server could not bind.
type ListenError struct {
	Addr string
	Err  error
}

func (e *ListenError) Error() string { return fmt.Sprintf("listen on %s: %v", e.Addr, e.Err) }
func (e *ListenError) Unwrap() error { return e.Err }

func randomSecret() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ClientURL is the TCP address other processes use; empty when in-process only.
func (s *Server) ClientURL() string {
	if s.ns.Addr() == nil {
		return ""
	}
	return s.ns.ClientURL()
}

// BotToken is the bots' credential this server accepts: ServerOptions.Token
// or the generated one; empty on an in-process-only bus without a token.
func (s *Server) BotToken() string { return s.token }

// TokenGenerated reports whether BotToken was generated at start.
func (s *Server) TokenGenerated() bool { return s.tokenGenerated }

// ConnectAs returns an in-process client connection (no TCP) with role's
// permissions.
func (s *Server) ConnectAs(role Role, name string, log *slog.Logger) (*nats.Conn, error) {
	cred := RoleCredential(role, s.internalSecret)
	if role == RoleBot {
		cred = BotCredential(s.token)
	}
	return connect("", name, log, append(cred.options(), nats.InProcessServer(s.ns))...)
}

// Connect returns an in-process client connection without any restriction,
// for tests and tools inside this process; services use ConnectAs.
func (s *Server) Connect(name string, log *slog.Logger) (*nats.Conn, error) {
	return connect("", name, log, nats.InProcessServer(s.ns), nats.UserInfo(trustedUser, s.trusted))
}

// InProcessConn is a raw in-process connection to the server
// (nats.InProcessServer); it must still authenticate.
func (s *Server) InProcessConn() (net.Conn, error) { return s.ns.InProcessConn() }

// Shutdown stops the server and waits for it.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}

func (c Credential) options() []nats.Option {
	var opts []nats.Option
	if c.User != "" {
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	}
	if isInternal(Role(c.User)) {
		// Replies to our services' requests go where no bot may listen.
		opts = append(opts, nats.CustomInboxPrefix(strings.TrimSuffix(ServiceInboxPrefix, ".")))
	}
	if c.Token != "" {
		opts = append(opts, nats.Token(c.Token))
	}
	return opts
}

// Connect joins an external or another process's NATS at url. It keeps
// retrying in the background when the server is not up yet, so a split
// deployment may start its processes in any order.
func Connect(url, token, name string, log *slog.Logger) (*nats.Conn, error) {
	return ConnectWith(url, BotCredential(token), name, log)
}

// ConnectWith is Connect with any credential. A role's user and password
// replace credentials written into url, which would otherwise win.
func ConnectWith(url string, cred Credential, name string, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	if cred.User != "" && cred.User != string(RoleBot) {
		url = StripUserinfo(url)
	}
	opts := append([]nats.Option{nats.RetryOnFailedConnect(true)}, cred.options()...)
	return connect(url, name, log, append(opts, extra...)...)
}

// Dial connects once, without retrying in the background: a command-line
// client wants to hear at once that nothing answers, or that its
// credential is refused.
func Dial(url string, cred Credential, name string, timeout time.Duration, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	opts := append(cred.options(), nats.Timeout(timeout))
	return connect(url, name, log, append(opts, extra...)...)
}

// StripUserinfo removes user names, passwords and tokens from a NATS URL
// or a comma-separated list of them, parsable or not, so the result can be
// logged, put in an error or used with credentials of another kind. The
// user part is everything up to the last '@' of each server: a password
// may hold '/', '#' or '?' when it was not percent-encoded.
func StripUserinfo(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		rest, scheme := p, ""
		if j := strings.Index(p, "://"); j >= 0 {
			scheme, rest = p[:j+3], p[j+3:]
		}
		if j := strings.LastIndex(rest, "@"); j >= 0 {
			rest = rest[j+1:]
		}
		parts[i] = scheme + rest
	}
	return strings.Join(parts, ",")
}

func connect(url, name string, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	var mu sync.Mutex
	lastRetryErr := ""
	opts := append([]nats.Option{
		// A connection that keeps retrying says why once per cause, not
		// at every attempt: a refused credential never fixes itself.
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				return
			}
			mu.Lock()
			same := err.Error() == lastRetryErr
			lastRetryErr = err.Error()
			mu.Unlock()
			switch {
			case same:
			case errors.Is(err, nats.ErrAuthorization) || strings.Contains(strings.ToLower(err.Error()), "authorization violation"):
				log.Error("nats refuses this process's credential; retrying (check NATS_INTERNAL_SECRET, or NATS_TOKEN for a bot)", "err", redactErr(err, url))
			default:
				log.Warn("nats not reachable yet; retrying", "err", redactErr(err, url))
			}
		}),
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", redactErr(err, url))
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "server", nc.ConnectedServerId()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Warn("nats async error", "subject", subj, "err", err)
		}),
	}, extra...)
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		// nats errors may echo the URL; never show its credentials.
		return nil, fmt.Errorf("nats connect: %s", redactErr(err, url))
	}
	return nc, nil
}

// redactErr is err's text with every server of url shown without its
// credentials: nats.go's errors quote the whole URL, or one server of it
// with the nats:// it added.
func redactErr(err error, url string) string {
	msg := err.Error()
	if url == "" || !strings.Contains(url, "@") {
		return msg
	}
	msg = strings.ReplaceAll(msg, url, StripUserinfo(url))
	for _, one := range strings.Split(url, ",") {
		if one = strings.TrimSpace(one); strings.Contains(one, "@") {
			msg = strings.ReplaceAll(msg, one, StripUserinfo(one))
		}
	}
	return msg
}

// Publish encodes v as JSON and publishes it.
func Publish(nc *nats.Conn, subject string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", subject, err)
	}
	if err := nc.Publish(subject, data); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	return nil
}

// ErrReplySubject is a request whose reply subject is not an inbox
// (InboxPrefix, ServiceInboxPrefix): it is not answered. nats-server lets a responder publish once to a request's
// reply subject whatever its publish permissions, so a bot that named an
// event subject (P.conn.standby, P.backup.done) as its reply would make our
// service publish that event for it.
var ErrReplySubject = errors.New("reply subject is not an inbox; not answered")

// replyAllowed reports whether subject is one a reply may go to: an inbox.
func replyAllowed(subject string) bool {
	return strings.HasPrefix(subject, InboxPrefix) || strings.HasPrefix(subject, ServiceInboxPrefix)
}

// Respond encodes v as the reply to m. It is the only way our services
// answer a request: a reply subject outside the inboxes is refused with
// ErrReplySubject (callers log it at debug: it is a bot's mistake or
// forgery, not ours).
func Respond(m *nats.Msg, v any) error {
	if !replyAllowed(m.Reply) {
		return fmt.Errorf("%w (%.64q)", ErrReplySubject, m.Reply)
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode reply: %w", err)
	}
	return m.Respond(data)
}

// Request sends v to subject and decodes the reply into out. It fails at
// once with nats.ErrNoResponders when nobody serves the subject.
func Request(ctx context.Context, nc *nats.Conn, subject string, v, out any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", subject, err)
	}
	msg, err := nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return fmt.Errorf("request %s: %w", subject, err)
	}
	if err := json.Unmarshal(msg.Data, out); err != nil {
		return fmt.Errorf("decode reply of %s: %w", subject, err)
	}
	return nil
}
