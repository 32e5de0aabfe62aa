package main

import (
	"context"
	"os"
	"path/filepath"

	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/wa"
	"github.com/nats-io/nats.go"
)

// newGateway builds the gateway service on nc: the whatsmeow adapter over
// $DATA_DIR/session.db, opened only once the supervisor says so (after the
// restore when backup is enabled).
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
	return gateway.New(gateway.Config{
		Session:       cfg.SessionID,
		Instance:      a.instance,
		Unit:          unit,
		OwnerNumber:   cfg.OwnerNumber,
		Prefix:        cfg.Prefix,
		PairPhone:     cfg.PairPhone,
		BackupEnabled: cfg.EnableSessionBackup,
		ReconnectMin:  cfg.ReconnectMin,
		ReconnectMax:  cfg.ReconnectMax,
		SendRate:      cfg.SendRate.Limit(), // burst 1: at most N+1 sends in any window of one period
	}, gateway.Deps{
		NC:     nc,
		Open:   open,
		Log:    log,
		Clock:  a.clock,
		ShowQR: wa.TerminalQR(os.Stderr),
	}), nil
}
