package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// The operator's commands on stored state: blacksky snapshots lists the
// points and full snapshots, blacksky restore writes one back (holding the
// session lease while it replaces a store).

// cmdSnapshots lists stored points and snapshots, newest first.
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
	var points []backup.PointInfo
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
		if points, err = st.ListPoints(ctx, a.cfg.SessionID, 100000); err != nil {
			return err
		}
	}
	type row struct {
		at   time.Time
		line string
	}
	var rows []row
	for _, p := range points {
		rows = append(rows, row{p.CreatedAt, fmt.Sprintf("p%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\tdatabase", p.ID,
			p.CreatedAt.UTC().Format(time.RFC3339Nano), p.Kind, p.Generation, p.Reason, humanBytes(p.SizeBytes),
			humanBytes(p.StoredBytes), prefix(p.DBSHA256))})
	}
	inDB := map[string]bool{}
	for _, s := range list {
		where := "database"
		if localSHA[s.SHA256] {
			where = "database+local"
		}
		inDB[s.SHA256] = true
		rows = append(rows, row{s.CreatedAt, fmt.Sprintf("%d\t%s\tfull\t-\t%s\t%s\t%s\t%s\t%s", s.ID,
			s.CreatedAt.UTC().Format(time.RFC3339Nano), s.Reason, humanBytes(s.SizeBytes), humanBytes(s.StoredBytes), prefix(s.SHA256), where)})
	}
	for _, f := range files {
		if inDB[f.SHA256] {
			continue
		}
		size := int64(0)
		if fi, err := os.Stat(f.Path); err == nil {
			size = fi.Size()
		}
		rows = append(rows, row{f.CreatedAt, fmt.Sprintf("-\t%s\tfull\t-\t%s\t-\t%s\t%s\tlocal", f.CreatedAt.Format(time.RFC3339Nano),
			f.Reason, humanBytes(size), prefix(f.SHA256))})
	}
	lp := backup.LocalPoints{Dir: filepath.Join(a.cfg.DataDir, "backups", "incr")}
	if lpoints, err := lp.List(); err == nil {
		for _, p := range lpoints {
			size := int64(0)
			fi, err := os.Stat(p.Path)
			if err == nil {
				size = fi.Size()
			}
			at := time.Time{}
			if fi != nil {
				at = fi.ModTime().UTC()
			}
			rows = append(rows, row{at, fmt.Sprintf("-\t%s\tpoint\t%d\t-\t-\t%s\t%s\tlocal", at.Format(time.RFC3339Nano),
				p.Generation, humanBytes(size), prefix(p.ID))})
		}
	}
	slices.SortStableFunc(rows, func(x, y row) int { return y.at.Compare(x.at) })
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTAKEN AT\tKIND\tGEN\tREASON\tSIZE\tSTORED\tSHA256\tWHERE")
	for _, r := range rows {
		fmt.Fprintln(tw, r.line)
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

// cmdRestore writes a snapshot or point into the session path.
func (m *Main) cmdRestore(ctx context.Context, args []string) error {
	fs := m.flags("restore")
	idFlag := fs.String("id", "", "a full snapshot id (17) or a point id (p17) from blacksky snapshots (default: the newest that verifies)")
	atFlag := fs.String("at", "", "restore the newest snapshot or point that verifies at or before this time (RFC 3339, e.g. 2026-11-26T12:00:00Z)")
	force := fs.Bool("force", false, "overwrite an existing session store (refused while an instance holds the session lease)")
	ignoreLease := fs.Bool("ignore-lease", false, "with --force, overwrite even while an instance holds the session lease: "+
		"only for an instance known to be dead, a live one would keep writing the old store")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	target, err := restoreTarget(*idFlag, *atFlag)
	if err != nil {
		return err
	}
	id := &target.SnapshotID
	if target.PointID != 0 {
		id = &target.PointID
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
		Local:       backup.Local{Dir: filepath.Join(a.cfg.DataDir, "backups")},
		LocalPoints: backup.LocalPoints{Dir: filepath.Join(a.cfg.DataDir, "backups", "incr")}, TmpDir: a.cfg.DataDir,
		Key: a.cfg.SessionEncryptionKey, AllowPlaintext: a.cfg.AllowPlaintextBackups, Log: a.log}
	st, err := a.openStore(ctx)
	switch {
	case err != nil && *id != 0:
		return fmt.Errorf("restore --id %s needs the database: %w", *idFlag, err)
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
	res, err := r.RestoreTarget(ctx, target)
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

// restoreTarget reads restore's --id and --at.
func restoreTarget(id, at string) (backup.Target, error) {
	var t backup.Target
	if id != "" && at != "" {
		return t, &UsageError{Msg: "--id and --at: give one of them"}
	}
	if id != "" {
		digits, point := strings.CutPrefix(id, "p")
		n, err := strconv.ParseInt(digits, 10, 64)
		if err != nil || n <= 0 {
			return t, &UsageError{Msg: fmt.Sprintf("--id: want a snapshot id (17) or a point id (p17) from blacksky snapshots, got %q", id)}
		}
		if point {
			t.PointID = n
		} else {
			t.SnapshotID = n
		}
	}
	if at != "" {
		when, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			return t, &UsageError{Msg: fmt.Sprintf("--at: want a time such as 2026-11-26T12:00:00Z (RFC 3339), got %q", at)}
		}
		t.At = when
	}
	return t, nil
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
