package main

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/wa"
	"github.com/nats-io/nats.go"
	"golang.org/x/term"
)

// newGateway builds the gateway service on nc: the whatsmeow adapter over
// $DATA_DIR/session.db (or, with WHATSAPP_SANDBOX, the sandbox over the same
// store), opened only once the supervisor says so (after the restore when
// backup is enabled).
func (a *app) newGateway(nc *nats.Conn) (runner, error) {
	cfg := a.cfg
	log := a.log.With("service", "gateway")
	open := func(ctx context.Context) (gateway.Conn, error) {
		return wa.Open(ctx, wa.Options{
			Path:    filepath.Join(cfg.DataDir, "session.db"),
			BotName: cfg.BotName,
			Log:     log.With("component", "whatsmeow"),
		})
	}
	unit, err := a.unit()
	if err != nil {
		return nil, err
	}
	var sb *sandboxGateway
	// After client_outdated: WhatsApp's current web version, from its web
	// page (timeout below the gateway's VersionFetchTimeout); in sandbox
	// mode the sandbox's, which never leaves the process.
	var versions gateway.VersionSource = wa.WebVersion{HTTP: &http.Client{Timeout: 20 * time.Second}}
	if cfg.WhatsAppSandbox {
		srv, sbOpen, ctl, err := a.openSandbox(nc)
		if err != nil {
			return nil, err
		}
		open, sb, versions = sbOpen, &sandboxGateway{srv: srv, ctl: ctl}, srv.Versions()
	}
	g := gateway.New(gateway.Config{
		Session:       cfg.SessionID,
		Instance:      a.instance,
		Unit:          unit,
		OwnerNumber:   cfg.OwnerNumber,
		Prefix:        cfg.Prefix,
		PairPhone:     cfg.PairPhone,
		BackupEnabled: cfg.EnableSessionBackup,
		PairURL:       a.pairURL,
		Production:    cfg.Production,
		ReconnectMin:  cfg.ReconnectMin,
		ReconnectMax:  cfg.ReconnectMax,
		SendRate:      cfg.SendRate.Limit(), // burst 1: at most N+1 sends in any window of one period
	}, gateway.Deps{
		NC:       nc,
		Open:     open,
		Log:      log,
		Clock:    a.clock,
		ShowQR:   terminalQR(cfg.Production, os.Stderr),
		Versions: versions,
	})
	if sb != nil {
		sb.gw = g
		return sb, nil
	}
	return g, nil
}

// terminalQR draws QR codes on f only in development or when f is a
// terminal: in production the output goes to log drains (Heroku's, an
// add-on's), and whoever reads a code there could link the bot to their own
// phone. /pair shows the code behind HEALTH_TOKEN.
func terminalQR(production bool, f *os.File) func(string) {
	if production && !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return wa.TerminalQR(f)
}
