package main

import (
	"context"
	"path/filepath"
	"sync"

	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox"
	"github.com/blacksky-md/blacksky/services/gateway/sandbox/sandboxbus"
	"github.com/nats-io/nats.go"
)

// sandboxGateway runs the gateway over the WhatsApp sandbox
// (WHATSAPP_SANDBOX=true): the sandbox's server file is open for as long
// as the gateway runs, and its control subjects are served beside it.
type sandboxGateway struct {
	gw  runner
	srv *sandbox.Server
	ctl *sandboxbus.Service
}

// openSandbox opens $DATA_DIR/sandbox.db and returns the Opener the
// gateway uses instead of wa.Open.
func (a *app) openSandbox(nc *nats.Conn) (*sandbox.Server, gateway.Opener, *sandboxbus.Service, error) {
	log := a.log.With("service", "gateway", "component", "sandbox")
	path := filepath.Join(a.cfg.DataDir, "sandbox.db")
	srv, err := sandbox.OpenServer(context.Background(), sandbox.ServerOptions{
		Path: path, Seed: a.cfg.SandboxSeed, Clock: a.clock, Log: log,
	})
	if err != nil {
		return nil, nil, nil, err
	}
	a.log.Warn("WHATSAPP_SANDBOX=true: the gateway talks to the built-in WhatsApp sandbox, not to WhatsApp",
		"server_file", path) // not the seed: the sandbox device's keys derive from it
	open := func(ctx context.Context) (gateway.Conn, error) {
		return srv.Open(ctx, sandbox.Options{
			Path: filepath.Join(a.cfg.DataDir, "session.db"),
			Log:  log,
		})
	}
	ctl := &sandboxbus.Service{NC: nc, Server: srv, Session: a.cfg.SessionID, Clock: a.clock, Log: log}
	return srv, open, ctl, nil
}

// Run serves the control subjects while the gateway runs, then closes the
// server file once the gateway (and so the session store) has stopped.
func (s *sandboxGateway) Run(ctx context.Context) error {
	ctlCtx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := s.ctl.Run(ctlCtx); err != nil {
			s.ctl.Log.Error("sandbox control", "err", err)
		}
	})
	err := s.gw.Run(ctx)
	cancel()
	wg.Wait()
	if cerr := s.srv.Close(); cerr != nil {
		s.ctl.Log.Warn("closing the sandbox server file", "err", cerr)
	}
	return err
}
