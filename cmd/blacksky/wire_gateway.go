package main

import (
	"errors"

	"github.com/nats-io/nats.go"
)

// newGateway builds the gateway service on nc. (Owned by the gateway work.)
func (a *app) newGateway(nc *nats.Conn) (runner, error) {
	return nil, errors.New("gateway: not built yet")
}
