package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/postgres"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/nats-io/nats.go"
)

// openStore connects to DATABASE_URL, or the embedded SQLite in DATA_DIR.
func (a *app) openStore(ctx context.Context) (backup.Store, error) {
	return a.openStoreTraced(ctx, nil)
}

// openStoreTraced is openStore with tracer watching the PostgreSQL pool
// (backup's outage filter).
func (a *app) openStoreTraced(ctx context.Context, tracer *dboutage.Outage) (backup.Store, error) {
	if a.cfg.DatabaseURL != "" {
		opts := postgres.Options{URL: a.cfg.PostgresURL(), MaxConns: a.cfg.DatabaseMaxConns}
		if tracer != nil {
			opts.Tracer = tracer
		}
		return postgres.Open(ctx, opts)
	}
	if err := os.MkdirAll(a.cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("DATA_DIR: %w", err)
	}
	return sqlite.Open(ctx, filepath.Join(a.cfg.DataDir, "blacksky.db"))
}

// newBackup builds the backup service on nc.
func (a *app) newBackup(nc *nats.Conn) (runner, error) {
	unit, err := a.unit()
	if err != nil {
		return nil, err
	}
	// One outage filter hears the pool fail and quiets River's log of it.
	outage := dboutage.New(a.log.With("service", bus.ServiceBackup), "backup")
	svc, err := backup.New(backup.Options{
		Config:   backupConfig(a.cfg),
		NC:       nc,
		Log:      a.log,
		Clock:    a.clock,
		Instance: a.instance,
		Unit:     unit,
		Open:     func(ctx context.Context) (backup.Store, error) { return a.openStoreTraced(ctx, outage) },
		Outage:   outage,
	})
	if err != nil {
		return nil, err
	}
	return svc, nil
}

// backupConfig is what the backup service uses of the configuration.
func backupConfig(c *config.Config) backup.Config {
	kind := "sqlite"
	if c.DatabaseURL != "" {
		kind = "postgres"
	}
	interval := c.BackupInterval
	if interval <= 0 {
		interval = -1 // none (zero would be backup's default)
	}
	return backup.Config{
		SessionID:       c.SessionID,
		DataDir:         c.DataDir,
		EncryptionKey:   c.SessionEncryptionKey,
		AllowPlaintext:  c.AllowPlaintextBackups,
		Production:      c.Production,
		Heroku:          c.Heroku,
		Interval:        interval,
		Retention:       c.BackupRetention,
		RetentionAge:    c.BackupRetentionAge,
		SyncInterval:    c.SyncInterval,
		ShutdownTimeout: c.ShutdownTimeout,
		DatabaseKind:    kind,
	}
}

// cmdMigrate creates or upgrades every table; the Heroku release phase runs it.
func (m *Main) cmdMigrate(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("migrate"), args); err != nil {
		return err
	}
	a, err := m.setup("migrate")
	if err != nil {
		return err
	}
	if err := a.cfg.RequireDatabase(); err != nil {
		return err
	}
	st, err := a.openStore(ctx)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.Migrate(ctx); err != nil {
		return err
	}
	rst, err := a.openRelayStore(ctx)
	if err != nil {
		return err
	}
	defer rst.Close()
	if err := rst.Migrate(ctx); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "migrations applied (%s)\n", st.Kind())
	return nil
}

// cmdBackupNow asks the running backup service for a snapshot over NATS.
func (m *Main) cmdBackupNow(ctx context.Context, args []string) error {
	fs := m.flags("backup-now")
	reason := fs.String("reason", bus.ReasonManual, "reason recorded with the snapshot: "+strings.Join(bus.RequestReasons(), ", "))
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the snapshot to be committed")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	body, _ := json.Marshal(bus.BackupRequest{Reason: *reason})
	if _, err := bus.DecodeBackupRequest(body); err != nil {
		return &UsageError{Msg: "--reason: " + err.Error()}
	}
	if *timeout <= 0 {
		return &UsageError{Msg: fmt.Sprintf("--timeout: want a positive duration such as 30s, got %s", *timeout)}
	}
	a, err := m.setup("backup-now")
	if err != nil {
		return err
	}
	nc, target, err := a.clientBus()
	if err != nil {
		return fmt.Errorf("backup-now: %w", err)
	}
	defer nc.Close()
	rctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	// The client keeps retrying a server that is not there; an operator
	// wants to hear that at once rather than after --timeout.
	if err := waitConnected(rctx, nc, 5*time.Second); err != nil {
		return fmt.Errorf("backup-now: %w at %s", err, target.at())
	}
	subj := bus.NewSubjects(a.cfg.SessionID).BackupRequest()
	msg, err := nc.RequestWithContext(rctx, subj, body)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("backup-now: no backup service answers on %s at %s%s (is blacksky run or blacksky backup up, with ENABLE_SESSION_BACKUP=true?)",
			subj, target.at(), a.sessionNote(target))
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("backup-now: no reply on %s within %s at %s%s", subj, *timeout, target.at(), a.sessionNote(target))
	case err != nil:
		return fmt.Errorf("backup-now: %w (at %s)", err, target.at())
	}
	fmt.Fprintln(a.stdout, string(msg.Data))
	var rep bus.BackupReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("backup-now: bad reply: %w", err)
	}
	if !rep.OK {
		return fmt.Errorf("backup-now: %s", rep.Error)
	}
	if rep.Stored != bus.StoredDatabase {
		return errLocalOnly
	}
	return nil
}

// errLocalOnly is a snapshot taken but kept on the backup's disk only: the
// database did not answer. A new dyno or container would not restore it.
var errLocalOnly = &exitError{code: 3, msg: "backup-now: the snapshot is in the local fallback only (the database did not answer): " +
	"a new dyno or container would not restore it; it reaches the database once the database answers again"}

// exitError is an error with its own exit code (ExitCode).
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }
func (e *exitError) ExitCode() int { return e.code }

// waitConnected waits up to d for nc to reach its server.
func waitConnected(ctx context.Context, nc *nats.Conn, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !nc.IsConnected() {
		select {
		case <-ctx.Done():
			return errors.New("cannot reach NATS (check NATS_URL, NATS_LISTEN and NATS_TOKEN)")
		case <-t.C:
		}
	}
	return nil
}
