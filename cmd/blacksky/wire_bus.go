package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/nats-io/nats.go"
)

// natsListen is where an embedded bus listens: NATS_LISTEN when set, else
// the default (which tests replace through Main.DefaultNATSListen).
func (m *Main) natsListen(cfg *config.Config) string {
	if cfg.NATSListenSet {
		return cfg.NATSListen
	}
	if m.DefaultNATSListen != "" {
		return m.DefaultNATSListen
	}
	return cfg.NATSListen
}

// busHandle is the bus of one process: one connection per role it runs,
// and the embedded server when it has one.
type busHandle struct {
	conns   map[bus.Role]*nats.Conn
	srv     *bus.Server
	dataDir string // where bus.json was written; empty: none
}

func (h *busHandle) conn(r bus.Role) *nats.Conn { return h.conns[r] }

func (h *busHandle) readyInfo(httpAddr string) ReadyInfo {
	info := ReadyInfo{HTTPAddr: httpAddr}
	if h.srv != nil {
		info.NATSURL, info.NATSToken = h.srv.ClientURL(), h.srv.BotToken()
	}
	return info
}

// close delivers what the services published last (conn.stopped, the
// final heartbeat), closes every connection, removes bus.json and stops the
// server.
func (h *busHandle) close() {
	for _, nc := range h.conns {
		_ = nc.FlushTimeout(2 * time.Second)
		nc.Close()
	}
	if h.dataDir != "" {
		_ = bus.RemoveBusFile(h.dataDir, os.Getpid())
	}
	if h.srv != nil {
		h.srv.Shutdown()
	}
}

// busFor gives the services of this process their connections, each as
// its own role: to an external NATS_URL, or to the embedded server, which
// listens on NATS_LISTEN (a free loopback port when the default is taken)
// and is announced in $DATA_DIR/bus.json for the CLI.
func (a *app) busFor(listen string, roles ...bus.Role) (*busHandle, error) {
	h := &busHandle{conns: map[bus.Role]*nats.Conn{}}
	if a.cfg.NATSURL != "" {
		cred := func(r bus.Role) bus.Credential { return bus.RoleCredential(r, a.cfg.NATSInternalSecret) }
		if a.cfg.NATSInternalSecret == "" {
			a.log.Warn("NATS_URL without NATS_INTERNAL_SECRET: our services connect with NATS_TOKEN, so the bus "+
				"cannot tell them from any bot holding it; configure the server from deploy/nats-server.conf and set NATS_INTERNAL_SECRET",
				"url", bus.StripUserinfo(a.cfg.NATSURL))
			cred = func(bus.Role) bus.Credential { return bus.BotCredential(a.cfg.NATSToken) }
		}
		for _, r := range roles {
			nc, err := bus.ConnectWith(a.cfg.NATSURL, cred(r), "blacksky-"+string(r), a.log)
			if err != nil {
				h.close()
				return nil, fmt.Errorf("NATS_URL %s: %w", bus.StripUserinfo(a.cfg.NATSURL), err)
			}
			h.conns[r] = nc
		}
		a.log.Info("nats: external server", "url", bus.StripUserinfo(a.cfg.NATSURL))
		return h, nil
	}
	srv, err := a.startBus(listen)
	if err != nil {
		return nil, err
	}
	h.srv = srv
	for _, r := range roles {
		nc, err := srv.ConnectAs(r, "blacksky-"+string(r), a.log)
		if err != nil {
			h.close()
			return nil, err
		}
		h.conns[r] = nc
	}
	url := srv.ClientURL()
	f := bus.BusFile{URL: dialableURL(url), PID: os.Getpid(), Session: a.cfg.SessionID, StartedAt: time.Now().UTC()}
	if srv.TokenGenerated() {
		f.Token = srv.BotToken()
	}
	err = os.MkdirAll(a.cfg.DataDir, 0o700)
	if err == nil {
		err = bus.WriteBusFile(a.cfg.DataDir, f)
	}
	if err != nil {
		a.log.Warn("cannot write bus.json; command-line clients need NATS_URL and NATS_TOKEN", "data_dir", a.cfg.DataDir, "err", err)
	} else {
		h.dataDir = a.cfg.DataDir
	}
	a.log.Info("nats bus listening", "url", url, "bots_credential", map[bool]string{true: "generated, in " + a.busFilePath(), false: "NATS_TOKEN"}[srv.TokenGenerated()])
	a.log.Info("watch the bus with the nats CLI", "cmd", a.natsCommand(url, srv.TokenGenerated()))
	return h, nil
}

// startBus starts the embedded server on NATS_LISTEN. A taken default port
// is no reason to stop (another bus, such as a system NATS server, often
// holds 4222): a free loopback port is taken instead. A taken NATS_LISTEN
// that the operator chose is an error naming it.
func (a *app) startBus(listen string) (*bus.Server, error) {
	// In sandbox mode the bots' credential may also publish sandbox.link,
	// inject, fault and outbox.
	opts := bus.ServerOptions{Listen: listen, Token: a.cfg.NATSToken, InternalSecret: a.cfg.NATSInternalSecret, Sandbox: a.cfg.WhatsAppSandbox,
		JetStream: a.cfg.NATSJetStream, JetStreamDir: filepath.Join(a.cfg.DataDir, "jetstream")}
	srv, err := bus.StartServer(opts)
	var le *bus.ListenError
	if errors.As(err, &le) {
		if a.cfg.NATSListenSet {
			return nil, &config.Error{Var: "NATS_LISTEN", Accepts: "an address no other program listens on",
				Got: fmt.Sprintf("%s (%v: choose another address, or unset NATS_LISTEN to use a free loopback port)", le.Addr, le.Err)}
		}
		host, _, _ := net.SplitHostPort(listen)
		opts.Listen = net.JoinHostPort(host, "0")
		srv, err = bus.StartServer(opts)
		if err == nil {
			a.log.Warn("nats: the default NATS_LISTEN address is taken; listening on a free port instead (see bus.json)",
				"taken", listen, "url", srv.ClientURL())
		}
	}
	if err != nil {
		return nil, err
	}
	return srv, nil
}

// busFilePath is bus.json's absolute path: printed in commands an operator
// pastes from another directory.
func (a *app) busFilePath() string {
	p := filepath.Join(a.cfg.DataDir, bus.BusFileName)
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// natsCommand is a ready-to-paste nats CLI line that watches this
// session's connection events. The token is read from bus.json (or the
// shell's NATS_TOKEN) when the line runs: it is never printed. nats.go
// takes a user part without password in the URL as the token.
func (a *app) natsCommand(url string, generated bool) string {
	token := `$NATS_TOKEN`
	if generated {
		token = `$(jq -r .token ` + shellQuote(a.busFilePath()) + `)`
	}
	withToken := strings.Replace(dialableURL(url), "nats://", "nats://"+token+"@", 1)
	subject := bus.NewSubjects(a.cfg.SessionID).ConnAll()
	// No double quotes: the log's text format would escape them, and the
	// line must paste as it is (the token is hex, safe unquoted).
	return fmt.Sprintf(`nats --server %s sub '%s'`, withToken, subject)
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// serviceBus is the connection of a service running in its own process
// (backup, health): as its role, to NATS_URL, else the bus announced in a
// usable bus.json on this machine, else an explicitly set NATS_LISTEN.
// Never the default address: whatever listens on 127.0.0.1:4222 (a system
// NATS server) would receive the role's password. It keeps retrying in the
// background, so the processes of a split deployment start in any order.
func (a *app) serviceBus(role bus.Role) (*busHandle, error) {
	if a.cfg.NATSInternalSecret == "" {
		return nil, &config.Error{Var: "NATS_INTERNAL_SECRET",
			Accepts: "the secret shared by the gateway, backup and health processes (openssl rand -hex 32)", Got: "nothing"}
	}
	t, err := a.findBus()
	if err != nil {
		return nil, &config.Error{Var: "NATS_URL",
			Accepts: "the bus of the gateway process (nats://host:port), or NATS_LISTEN set to where it listens",
			Got:     "nothing (" + err.Error() + ")"}
	}
	nc, err := bus.ConnectWith(t.url, bus.RoleCredential(role, a.cfg.NATSInternalSecret), "blacksky-"+string(role), a.log)
	if err != nil {
		return nil, fmt.Errorf("nats at %s (from %s): %w", t.shown(), t.from, err)
	}
	a.log.Info("nats: connecting", "url", t.shown(), "from", t.from)
	return &busHandle{conns: map[bus.Role]*nats.Conn{role: nc}}, nil
}

// busTarget is where a client or a split service finds the bus.
type busTarget struct {
	url   string
	from  string // "NATS_URL", "bus.json (/abs/path)", "NATS_LISTEN"
	token string // the bots' token bus.json holds, if any
	// session is the SESSION_ID of the process that wrote bus.json.
	session string
}

func (t busTarget) shown() string { return bus.StripUserinfo(t.url) }

// at names the address and where it came from, for errors.
func (t busTarget) at() string { return fmt.Sprintf("%s (from %s)", t.shown(), t.from) }

// findBus is where the bus is: NATS_URL, else the bus.json of a run or
// gateway process on this machine, else an explicitly set NATS_LISTEN.
// Without any of them it fails, saying why bus.json was skipped: the
// default address is never dialled on a guess.
func (a *app) findBus() (busTarget, error) {
	if a.cfg.NATSURL != "" {
		return busTarget{url: a.cfg.NATSURL, from: "NATS_URL"}, nil
	}
	path := a.busFilePath()
	f, err := bus.ReadBusFile(a.cfg.DataDir)
	var why string
	switch {
	case err == nil:
		return busTarget{url: f.URL, from: "bus.json " + path, token: f.Token, session: f.Session}, nil
	case errors.Is(err, bus.ErrStaleBusFile):
		why = fmt.Sprintf("%s is stale: pid %d is gone", path, f.PID)
	case errors.Is(err, os.ErrNotExist):
		why = fmt.Sprintf("%s not found in DATA_DIR=%s", bus.BusFileName, filepath.Dir(path))
	default:
		why = fmt.Sprintf("%s skipped: %v", bus.BusFileName, err)
	}
	if a.cfg.NATSListenSet {
		return busTarget{url: "nats://" + dialable(a.cfg.NATSListen), from: "NATS_LISTEN; " + why}, nil
	}
	return busTarget{}, fmt.Errorf("NATS_URL is not set, NATS_LISTEN is not set and %s", why)
}

// clientBus connects a command-line client (backup-now and every command
// that talks to a running process) with the bots' credential: NATS_TOKEN,
// else the token of bus.json. Unlike a service it does not wait for a bus
// to appear: it fails at once, naming the address it tried and where that
// came from. Without SESSION_ID the session is bus.json's.
func (a *app) clientBus() (*nats.Conn, busTarget, error) {
	t, err := a.findBus()
	if err != nil {
		return nil, t, fmt.Errorf("no bus to reach: %w (start blacksky run or gateway with this DATA_DIR, or set NATS_URL)", err)
	}
	if !a.sessionSet && t.session != "" {
		a.cfg.SessionID = t.session
	}
	token := a.cfg.NATSToken
	if token == "" {
		token = t.token
	}
	nc, err := bus.Dial(t.url, bus.BotCredential(token), "blacksky-"+a.role, 5*time.Second, a.log)
	if err == nil {
		return nc, t, nil
	}
	if errors.Is(err, nats.ErrAuthorization) || strings.Contains(strings.ToLower(err.Error()), "authorization") {
		return nil, t, fmt.Errorf("NATS at %s refused the credential: set NATS_TOKEN to the bus's token", t.at())
	}
	return nil, t, fmt.Errorf("cannot reach NATS at %s: %v", t.at(), err)
}

// sessionNote explains a request nobody answered when SESSION_ID names
// another session than the process that wrote bus.json serves.
func (a *app) sessionNote(t busTarget) string {
	if a.sessionSet && t.session != "" && bus.SessionToken(t.session) != bus.SessionToken(a.cfg.SessionID) {
		return fmt.Sprintf("; SESSION_ID is %q but the process of bus.json serves session %q", a.cfg.SessionID, t.session)
	}
	return ""
}

// dialable turns a listen address into one a client on this machine
// dials: a wildcard host (0.0.0.0, ::, none) becomes 127.0.0.1.
func dialable(hostport string) string {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// dialableURL is dialable for a nats:// URL.
func dialableURL(u string) string {
	const scheme = "nats://"
	if !strings.HasPrefix(u, scheme) {
		return u
	}
	return scheme + dialable(strings.TrimPrefix(u, scheme))
}
