package main

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"
)

// newBackup builds the backup service on nc. (Owned by the backup work.)
func (a *app) newBackup(nc *nats.Conn) (runner, error) {
	return nil, errors.New("backup: not built yet")
}

func (m *Main) cmdMigrate(ctx context.Context, args []string) error {
	return errors.New("migrate: not built yet")
}

func (m *Main) cmdBackupNow(ctx context.Context, args []string) error {
	return errors.New("backup-now: not built yet")
}

func (m *Main) cmdSnapshots(ctx context.Context, args []string) error {
	return errors.New("snapshots: not built yet")
}

func (m *Main) cmdRestore(ctx context.Context, args []string) error {
	return errors.New("restore: not built yet")
}
