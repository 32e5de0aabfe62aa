package main

import (
	"context"
	"errors"
	"net"

	"github.com/nats-io/nats.go"
)

// newHealth builds the HTTP service on ln. (Owned by the health work.)
func (a *app) newHealth(nc *nats.Conn, ln net.Listener) (runner, error) {
	return nil, errors.New("health: not built yet")
}

func (m *Main) cmdHealthcheck(ctx context.Context, args []string) error {
	return errors.New("healthcheck: not built yet")
}
