package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// snapshotRow is one stored backup of a session as `blacksky snapshots`
// lists it: an incremental point (blacksky_points, SYNC_INTERVAL > 0) or a
// full snapshot (blacksky_snapshots, SYNC_INTERVAL=0).
type snapshotRow struct {
	ID     int64
	Point  bool   // a point: "p<ID>" for the CLI
	Kind   string // base, delta, or full for a snapshot
	Reason string
	// SHA256 is a full snapshot's sha256 of the session database file, a
	// point's bincr/1 database hash (incr.DBHash): compare a file with
	// storeHash.
	SHA256 string
	Size   int64
	At     time.Time
}

// CLIID is the row's id as `blacksky snapshots` prints it and `restore --id`
// takes it.
func (r snapshotRow) CLIID() string {
	if r.Point {
		return "p" + strconv.FormatInt(r.ID, 10)
	}
	return strconv.FormatInt(r.ID, 10)
}

// snapshots lists the session's stored points and full snapshots, oldest
// first (the newest last), by the time each was taken.
func snapshots(t *testing.T, dbURL, session string) []snapshotRow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("connect to the test database: %v", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `
		SELECT id, false, 'full', reason, sha256, size_bytes, created_at FROM blacksky_snapshots WHERE session_id = $1
		UNION ALL
		SELECT id, true, kind, reason, db_sha256, size_bytes, created_at FROM blacksky_points WHERE session_id = $1
		ORDER BY 7, 2, 1`, session)
	if err != nil {
		t.Fatalf("read blacksky_snapshots and blacksky_points: %v", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (snapshotRow, error) {
		var s snapshotRow
		err := r.Scan(&s.ID, &s.Point, &s.Kind, &s.Reason, &s.SHA256, &s.Size, &s.At)
		return s, err
	})
	if err != nil {
		t.Fatalf("read blacksky_snapshots and blacksky_points: %v", err)
	}
	return out
}

// findRow returns the row a backup reply names: with SYNC_INTERVAL > 0 its
// snapshot.id is a point's.
func findRow(rows []snapshotRow, id int64, point bool) (snapshotRow, bool) {
	for _, r := range rows {
		if r.ID == id && r.Point == point {
			return r, true
		}
	}
	return snapshotRow{}, false
}

// storeHash is the session database at path hashed as row records it: the
// file's sha256 for a full snapshot, its bincr/1 database hash for a point.
// The file must hold the whole database (a restored store before anything
// opened it, or a store whose last connection closed): a WAL with frames
// in it fails the test.
func storeHash(t *testing.T, path string, row snapshotRow) string {
	t.Helper()
	if !row.Point {
		return fileSHA(t, path)
	}
	if fi, err := os.Stat(path + "-wal"); err == nil && fi.Size() > 0 {
		t.Fatalf("%s has a WAL of %d bytes: the file alone is not the database", path, fi.Size())
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if len(b) < 100 {
		t.Fatalf("%s is %d bytes: not a SQLite database", path, len(b))
	}
	pageSize := int(binary.BigEndian.Uint16(b[16:18]))
	if pageSize == 1 {
		pageSize = 65536
	}
	n := len(b) / pageSize
	// SQLite's own page count: the header's, when it is valid (its
	// version-valid-for number equals the change counter).
	if hn := int(binary.BigEndian.Uint32(b[28:32])); hn > 0 && hn <= n && string(b[92:96]) == string(b[24:28]) {
		n = hn
	}
	pages := make([]incr.Hash, n)
	for i := range pages {
		pages[i] = sha256.Sum256(b[i*pageSize : (i+1)*pageSize])
	}
	return incr.DBHash(pageSize, pages).String()
}

// shutdownFoundUnchanged reports whether p's log says its shutdown backup
// found the store as the newest stored point or snapshot already held it
// (an unchanged store is not stored again: the shutdown row is that one).
func shutdownFoundUnchanged(p *proc) bool {
	return shutdownUnchanged.MatchString(p.out.String())
}

var shutdownUnchanged = regexp.MustCompile(`msg="snapshot done".* reason=shutdown .*unchanged=true|"msg":"snapshot done".*"reason":"shutdown".*"unchanged":true`)

// checkShutdownRow fails the test unless the process's shutdown backup
// stored the newest of rows or found the store unchanged since it (CONTRACT
// guarantee 3) and, for a point, that row holds the store at path exactly as
// the stopped process left it. (A full snapshot is SQLite's online backup of
// the store: the same database in a file of its own, whose bytes differ.) It
// returns that row.
func checkShutdownRow(t *testing.T, rows []snapshotRow, p *proc, path string) snapshotRow {
	t.Helper()
	if len(rows) == 0 {
		t.Fatalf("%s stopped and nothing is stored", p.name)
	}
	last := rows[len(rows)-1]
	if last.Reason != bus.ReasonShutdown && !shutdownFoundUnchanged(p) {
		t.Fatalf("stored after %s stopped: %+v; want a shutdown point or snapshot last, or the shutdown backup to find the newest unchanged", p.name, rows)
	}
	if !last.Point {
		return last
	}
	if got := storeHash(t, path, last); got != last.SHA256 {
		t.Fatalf("the newest stored backup %s (%s) holds %s, not the store %s left (%s)", last.CLIID(), last.Reason, last.SHA256, p.name, got)
	}
	return last
}
