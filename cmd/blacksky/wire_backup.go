package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/postgres"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/nats-io/nats.go"
)

// openStore connects to DATABASE_URL, or the embedded SQLite in DATA_DIR.
func (a *app) openStore(ctx context.Context) (backup.Store, error) {
	if a.cfg.DatabaseURL != "" {
		return postgres.Open(ctx, postgres.Options{URL: a.cfg.PostgresURL(), MaxConns: a.cfg.DatabaseMaxConns})
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
	svc, err := backup.New(backup.Options{
		Config:   backupConfig(a.cfg),
		NC:       nc,
		Log:      a.log,
		Clock:    a.clock,
		Instance: a.instance,
		Unit:     unit,
		Open:     a.openStore,
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

// cmdSnapshots lists stored snapshots, newest first.
func (m *Main) cmdSnapshots(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("snapshots"), args); err != nil {
		return err
	}
	a, err := m.setup("snapshots")
	if err != nil {
		return err
	}
	local := backup.Local{Dir: filepath.Join(a.cfg.DataDir, "backups")}
	files, err := local.List()
	if err != nil {
		return err
	}
	localSHA := map[string]bool{}
	for _, f := range files {
		localSHA[f.SHA256] = true
	}
	var list []backup.Snapshot
	st, err := a.openStore(ctx)
	if err != nil {
		fmt.Fprintf(m.Stderr, "database unreachable (%v); showing the local fallback only\n", err)
	} else {
		defer st.Close()
		if err := st.Migrate(ctx); err != nil {
			return err
		}
		if list, err = st.List(ctx, a.cfg.SessionID, 100000); err != nil {
			return err
		}
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTAKEN AT\tREASON\tSIZE\tSTORED\tSHA256\tWHERE")
	inDB := map[string]bool{}
	for _, s := range list {
		where := "database"
		if localSHA[s.SHA256] {
			where = "database+local"
		}
		inDB[s.SHA256] = true
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.CreatedAt.UTC().Format(time.RFC3339), s.Reason,
			humanBytes(s.SizeBytes), humanBytes(s.StoredBytes), prefix(s.SHA256), where)
	}
	for _, f := range files {
		if inDB[f.SHA256] {
			continue
		}
		size := int64(0)
		if fi, err := os.Stat(f.Path); err == nil {
			size = fi.Size()
		}
		fmt.Fprintf(tw, "-\t%s\t%s\t-\t%s\t%s\tlocal\n", f.CreatedAt.Format(time.RFC3339), f.Reason, humanBytes(size), prefix(f.SHA256))
	}
	return tw.Flush()
}

func prefix(sha string) string { return sha[:min(12, len(sha))] }

func humanBytes(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// cmdRestore writes a snapshot into the session path.
func (m *Main) cmdRestore(ctx context.Context, args []string) error {
	fs := m.flags("restore")
	id := fs.Int64("id", 0, "database snapshot id (default: the newest that verifies)")
	force := fs.Bool("force", false, "overwrite an existing session store (refused while an instance holds the session lease)")
	ignoreLease := fs.Bool("ignore-lease", false, "with --force, overwrite even while an instance holds the session lease: "+
		"only for an instance known to be dead, a live one would keep writing the old store")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *id < 0 {
		return &UsageError{Msg: fmt.Sprintf("--id: want a snapshot id from blacksky snapshots, got %d", *id)}
	}
	a, err := m.setup("restore")
	if err != nil {
		return err
	}
	sessionPath := filepath.Join(a.cfg.DataDir, "session.db")
	_, serr := os.Stat(sessionPath)
	replacing := serr == nil
	if replacing && !*force {
		return fmt.Errorf("restore: %s exists; stop the bot and pass --force to replace it", sessionPath)
	}
	r := &backup.Restorer{Session: a.cfg.SessionID, SessionPath: sessionPath,
		Local: backup.Local{Dir: filepath.Join(a.cfg.DataDir, "backups")}, TmpDir: a.cfg.DataDir,
		Key: a.cfg.SessionEncryptionKey, AllowPlaintext: a.cfg.AllowPlaintextBackups, Log: a.log}
	st, err := a.openStore(ctx)
	switch {
	case err != nil && *id != 0:
		return fmt.Errorf("restore --id %d needs the database: %w", *id, err)
	case err != nil && replacing && !*ignoreLease:
		return fmt.Errorf("restore: the database is unreachable, so the session lease cannot be checked "+
			"(a running instance would keep writing the store being replaced); pass --ignore-lease once sure none runs: %w", err)
	case err != nil:
		a.log.Warn("database unreachable; restoring from the local fallback", "err", err)
	default:
		defer st.Close()
		if err := st.Migrate(ctx); err != nil {
			return err
		}
		r.Store = st
		if replacing {
			release, err := a.holdLeaseForRestore(ctx, st, *ignoreLease)
			if err != nil {
				return err
			}
			defer release()
		}
	}
	res, err := r.Restore(ctx, *id)
	if err != nil {
		return err
	}
	if !res.Restored {
		return errors.New("restore: no snapshot verifies; nothing written")
	}
	out, _ := json.Marshal(bus.RestoreReply{OK: true, Restored: true, Source: res.Source, SnapshotID: res.SnapshotID})
	fmt.Fprintln(a.stdout, string(out))
	return nil
}

// restoreLeaseTTL bounds how long a restore holds the session lease if it
// dies before releasing it. It is also the TTL the row advertises: a standby
// (backup.LeaseWatch) watches the row that long before taking it, so a
// restore that runs slowly is never displaced by a standby mid-write.
const restoreLeaseTTL = 10 * time.Minute

// holdLeaseForRestore takes the session lease for the time of a restore that
// replaces the store, so no instance opens the store meanwhile; it refuses
// while an instance holds the lease: that instance has the store open and
// would keep writing the old one (or overwrite the restored one with its
// next snapshot). ignore overrides the refusal, loudly.
func (a *app) holdLeaseForRestore(ctx context.Context, st backup.Store, ignore bool) (release func(), err error) {
	holder := "restore-cli:" + a.instance
	take := func(stale backup.Lease) (backup.Lease, bool, error) {
		lease, ok, err := st.AcquireLease(ctx, a.cfg.SessionID, holder, a.clock.Now(), restoreLeaseTTL, stale)
		if err != nil {
			return lease, false, fmt.Errorf("restore: check the session lease: %w", err)
		}
		return lease, ok, nil
	}
	lease, ok, err := take(backup.Lease{})
	if err != nil {
		return nil, err
	}
	if !ok && !ignore {
		// An expiry alone frees nothing (backup's lease rule): the row of a
		// crashed instance is taken only after watching it unchanged for a
		// whole TTL, as a standby would.
		lease, ok, err = a.watchLease(ctx, lease, take)
		if err != nil {
			return nil, err
		}
	}
	if ok {
		return func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			if err := st.ReleaseLease(rctx, a.cfg.SessionID, holder); err != nil {
				a.log.Warn("restore: lease not released; it expires by itself", "in", restoreLeaseTTL, "err", err)
			}
		}, nil
	}
	if !ignore {
		return nil, fmt.Errorf("restore: instance %q holds the session lease and renewed it while we watched: it is running with the store open. "+
			"Stop it first; pass --ignore-lease only if it is dead", lease.Holder)
	}
	a.log.Warn("restore: replacing the session store although another instance holds the session lease (--ignore-lease): "+
		"if it is alive it keeps writing the old store, its next snapshot overwrites this restore, and WhatsApp may log the device out",
		"holder", lease.Holder, "until", lease.ExpiresAt)
	return func() {}, nil
}

// watchLease watches a lease row held by another instance with the backup
// service's own rule (backup.LeaseWatch): unchanged for the holder's whole
// TTL (at least backup.DefaultLeaseTTL), the holder is gone and the row is
// taken; renewed meanwhile, the holder is alive and ok is false.
func (a *app) watchLease(ctx context.Context, seen backup.Lease, take func(stale backup.Lease) (backup.Lease, bool, error)) (backup.Lease, bool, error) {
	const retry = backup.DefaultStandbyRetry
	w := backup.LeaseWatch{TTL: backup.DefaultLeaseTTL, MaxGap: backup.DefaultWatchMaxGap}
	w.Answered(seen, a.clock.Now(), a.clock.Now())
	a.log.Info("restore: another instance holds the session lease; watching it to see whether it is alive",
		"holder", seen.Holder, "for", w.Need(seen))
	tick := a.clock.NewTicker(retry)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return seen, false, ctx.Err()
		case <-tick.Chan():
		}
		sent := a.clock.Now()
		now, ok, err := take(w.Stale(sent))
		if err != nil || ok {
			return now, ok, err
		}
		if now.Holder == "" {
			w.Reset()
			continue // released meanwhile: the next take gets it
		}
		w.Answered(now, sent, a.clock.Now())
		if !now.Same(seen) {
			return now, false, nil
		}
	}
}

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
