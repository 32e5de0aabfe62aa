package main

import (
	"errors"
	"fmt"
	"net"
	"os"
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
	f := bus.BusFile{URL: url, PID: os.Getpid(), Session: a.cfg.SessionID, StartedAt: time.Now().UTC()}
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
	opts := bus.ServerOptions{Listen: listen, Token: a.cfg.NATSToken, InternalSecret: a.cfg.NATSInternalSecret, Sandbox: a.cfg.WhatsAppSandbox}
	srv, err := bus.StartServer(opts)
	var le *bus.ListenError
	if errors.As(err, &le) {
		if a.cfg.NATSListenSet {
			return nil, fmt.Errorf("NATS_LISTEN %s: %w (another process listens there: choose another address, or unset NATS_LISTEN to use a free loopback port)", le.Addr, le.Err)
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

func (a *app) busFilePath() string {
	return strings.TrimSuffix(a.cfg.DataDir, "/") + "/" + bus.BusFileName
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
	withToken := strings.Replace(url, "nats://", "nats://"+token+"@", 1)
	subject := bus.NewSubjects(a.cfg.SessionID).ConnAll()
	// No double quotes: the log's text format would escape them, and the
	// line must paste as it is (the token is hex, safe unquoted).
	return fmt.Sprintf(`nats --server %s sub '%s'`, withToken, subject)
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// serviceBus is the connection of a service running in its own process
// (backup, health): as its role, to NATS_URL, else the bus announced in
// bus.json on this machine, else NATS_LISTEN. It keeps retrying in the
// background, so the processes of a split deployment start in any order.
func (a *app) serviceBus(role bus.Role) (*busHandle, error) {
	if a.cfg.NATSInternalSecret == "" {
		return nil, &config.Error{Var: "NATS_INTERNAL_SECRET",
			Accepts: "the secret shared by the gateway, backup and health processes (openssl rand -hex 32)", Got: "nothing"}
	}
	url, from, _ := a.busURL()
	nc, err := bus.ConnectWith(url, bus.RoleCredential(role, a.cfg.NATSInternalSecret), "blacksky-"+string(role), a.log)
	if err != nil {
		return nil, fmt.Errorf("nats at %s (from %s): %w", bus.StripUserinfo(url), from, err)
	}
	a.log.Info("nats: connecting", "url", bus.StripUserinfo(url), "from", from)
	return &busHandle{conns: map[bus.Role]*nats.Conn{role: nc}}, nil
}

// busURL is where a client finds the bus: NATS_URL, else the bus.json of a
// run or gateway process on this machine, else NATS_LISTEN. It also
// returns the token bus.json holds, if any.
func (a *app) busURL() (url, from, token string) {
	if a.cfg.NATSURL != "" {
		return a.cfg.NATSURL, "NATS_URL", ""
	}
	f, err := bus.ReadBusFile(a.cfg.DataDir)
	switch {
	case err == nil:
		return f.URL, a.busFilePath(), f.Token
	case errors.Is(err, bus.ErrStaleBusFile):
		return "nats://" + a.cfg.NATSListen, fmt.Sprintf("NATS_LISTEN; %s is stale: process %d is gone", a.busFilePath(), f.PID), ""
	case !errors.Is(err, os.ErrNotExist):
		return "nats://" + a.cfg.NATSListen, "NATS_LISTEN; " + err.Error(), ""
	}
	return "nats://" + a.cfg.NATSListen, "NATS_LISTEN", ""
}

// clientBus connects a command-line client (backup-now and every command
// that talks to a running process) with the bots' credential: NATS_TOKEN,
// else the token of bus.json. Unlike a service it does not wait for a bus
// to appear: it fails at once, naming the address it tried.
func (a *app) clientBus() (*nats.Conn, error) {
	url, from, fileToken := a.busURL()
	token := a.cfg.NATSToken
	if token == "" {
		token = fileToken
	}
	nc, err := bus.Dial(url, bus.BotCredential(token), "blacksky-"+a.role, 5*time.Second, a.log)
	if err == nil {
		return nc, nil
	}
	shown := bus.StripUserinfo(url)
	if errors.Is(err, nats.ErrAuthorization) || strings.Contains(strings.ToLower(err.Error()), "authorization") {
		return nil, fmt.Errorf("NATS at %s (from %s) refused the credential: set NATS_TOKEN to the bus's token", shown, from)
	}
	return nil, fmt.Errorf("cannot reach NATS at %s (from %s): %v", shown, from, err)
}
