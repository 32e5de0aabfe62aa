package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// ServerOptions configure the embedded NATS server.
type ServerOptions struct {
	// Listen is host:port for other processes; empty means in-process only
	// (no TCP port at all). Port 0 or -1 picks a free port (tests).
	Listen string
	// Token, when set, is required from every client.
	Token string
	// MaxPayload in bytes; 0 keeps the NATS default of 1 MB.
	MaxPayload int32
}

// Server is the embedded NATS server.
type Server struct {
	ns    *server.Server
	token string
}

// StartServer starts the embedded server and waits until it accepts clients.
func StartServer(opts ServerOptions) (*Server, error) {
	o := &server.Options{
		ServerName:    "blacksky",
		NoSigs:        true, // the process owns SIGTERM, not the server
		NoLog:         true,
		Authorization: opts.Token,
		MaxPayload:    opts.MaxPayload,
		MaxPending:    64 << 20,
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
	}
	ns, err := server.NewServer(o)
	if err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, errors.New("nats server: not ready after 10s (is the port taken?)")
	}
	return &Server{ns: ns, token: opts.Token}, nil
}

// ClientURL is the TCP address other processes use; empty when in-process only.
func (s *Server) ClientURL() string {
	if s.ns.Addr() == nil {
		return ""
	}
	return s.ns.ClientURL()
}

// Connect returns an in-process client connection (no TCP).
func (s *Server) Connect(name string, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{nats.InProcessServer(s.ns)}
	if s.token != "" {
		opts = append(opts, nats.Token(s.token))
	}
	return connect("", name, log, opts...)
}

// Shutdown stops the server and waits for it.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}

// Connect joins an external or another process's NATS at url. It keeps
// retrying in the background when the server is not up yet, so a split
// deployment may start its processes in any order.
func Connect(url, token, name string, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{nats.RetryOnFailedConnect(true)}
	if token != "" {
		opts = append(opts, nats.Token(token))
	}
	return connect(url, name, log, opts...)
}

func connect(url, name string, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	opts := append([]nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
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

func redactErr(err error, url string) string {
	msg := err.Error()
	if url == "" {
		return msg
	}
	return strings.ReplaceAll(msg, url, "(NATS_URL)")
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

// Respond encodes v as the reply to m.
func Respond(m *nats.Msg, v any) error {
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
