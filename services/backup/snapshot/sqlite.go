package snapshot

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"modernc.org/sqlite"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
)

// backuper is the part of modernc's driver connection we use: the SQLite online backup API.
type backuper interface {
	NewBackup(dstURI string) (*sqlite.Backup, error)
}

// dsn builds a modernc URI for path. Read-only connections never write the store, but may create the -shm and -wal
// files SQLite needs to read a WAL database; they never checkpoint or delete the WAL.
func dsn(path string, readOnly bool, pragmas ...string) string {
	q := url.Values{}
	if readOnly {
		q.Set("mode", "ro")
	}
	q.Add("_pragma", "busy_timeout(10000)")
	for _, p := range pragmas {
		q.Add("_pragma", p)
	}
	return sqlitefile.URI(path, q)
}

// openRO opens the database file at path read-only, with one connection. It refuses a missing file rather than let
// SQLite create an empty database in its place.
func openRO(path string) (*sql.DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("session store: %w", err)
	}
	db, err := sql.Open("sqlite", dsn(path, true))
	if err != nil {
		return nil, fmt.Errorf("open session store: %w", err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// ReadConsistent returns a transactionally consistent copy of the live SQLite database at path while another
// process or connection (whatsmeow, WAL mode) may be writing to it.
//
// It uses the online backup API in a single step into a fresh temporary file next to path: one read transaction, so
// the copy is one committed state of the store, and writers are never blocked in WAL mode. The copy keeps page
// numbers (unlike VACUUM INTO, which rebuilds the file), and the destination is always new, so an unchanged store
// gives byte-identical output and the same sha256. A multi-step backup would restart whenever the gateway commits,
// so it could starve under steady traffic; a single step cannot.
func ReadConsistent(ctx context.Context, path string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	src, err := openRO(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()

	copyPattern := "." + filepath.Base(path) + ".copy-*"
	RemoveStale(filepath.Dir(path), copyPattern)
	tmp, err := os.CreateTemp(filepath.Dir(path), copyPattern)
	if err != nil {
		return nil, fmt.Errorf("read session store: temp file: %w", err)
	}
	tmpPath := tmp.Name()
	_ = tmp.Close()
	defer RemoveDB(tmpPath)

	conn, err := src.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("read session store: %w", err)
	}
	defer conn.Close()

	// The destination needs no journal and no fsync: it is thrown away once read, and a crash leaves only a
	// temp file.
	dst := dsn(tmpPath, false, "journal_mode(OFF)", "synchronous(OFF)")
	err = conn.Raw(func(dc any) error {
		b, ok := dc.(backuper)
		if !ok {
			return errors.New("sqlite driver has no online backup API")
		}
		bk, err := b.NewBackup(dst)
		if err != nil {
			return fmt.Errorf("start backup: %w", err)
		}
		if _, err := bk.Step(-1); err != nil {
			_ = bk.Finish()
			return fmt.Errorf("copy pages: %w", err)
		}
		if err := bk.Finish(); err != nil {
			return fmt.Errorf("finish backup: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read session store: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(tmpPath)
	if err != nil {
		return nil, fmt.Errorf("read session store copy: %w", err)
	}
	return data, nil
}

// Check runs PRAGMA integrity_check on the SQLite file at path and returns an error describing the first problems
// if it does not answer "ok". The full check (not quick_check) also verifies that every index matches its table:
// a restored store with a broken index would fail later inside whatsmeow, far from the cause. It runs once per
// restore or start, where its cost (measured in the report) is small next to a reconnect.
func Check(ctx context.Context, path string) error {
	db, err := openRO(path)
	if err != nil {
		return err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, "PRAGMA integrity_check(20)")
	if err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	defer rows.Close()
	var msgs []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return fmt.Errorf("integrity check: %w", err)
		}
		msgs = append(msgs, s)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	if len(msgs) == 1 && msgs[0] == "ok" {
		return nil
	}
	return fmt.Errorf("integrity check failed: %s", strings.Join(msgs, "; "))
}

// HasDevice reports whether the whatsmeow store at path holds a linked device (a row in whatsmeow_device). A store
// without one must never be stored as the session (CONTRACT guarantee 5). A missing table means false, nil.
func HasDevice(ctx context.Context, path string) (bool, error) {
	db, err := openRO(path)
	if err != nil {
		return false, err
	}
	defer db.Close()
	var n int
	err = db.QueryRowContext(ctx,
		"SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'whatsmeow_device'").Scan(&n)
	if err != nil {
		return false, fmt.Errorf("look for whatsmeow_device: %w", err)
	}
	if n == 0 {
		return false, nil
	}
	var has bool
	if err := db.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM whatsmeow_device)").Scan(&has); err != nil {
		return false, fmt.Errorf("read whatsmeow_device: %w", err)
	}
	return has, nil
}

// Verify writes plain into a temp file in tmpDir and runs Check and HasDevice on it (used before restoring: nothing
// is written to the session path until the bytes are known to be a sound store). The temp file is removed.
func Verify(ctx context.Context, plain []byte, tmpDir string) (hasDevice bool, err error) {
	RemoveStale(tmpDir, verifyPattern)
	f, err := os.CreateTemp(tmpDir, verifyPattern)
	if err != nil {
		return false, fmt.Errorf("verify snapshot: temp file: %w", err)
	}
	p := f.Name()
	defer RemoveDB(p)
	_, werr := f.Write(plain)
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		return false, fmt.Errorf("verify snapshot: write temp file: %w", err)
	}
	if err := Check(ctx, p); err != nil {
		return false, fmt.Errorf("verify snapshot: %w", err)
	}
	has, err := HasDevice(ctx, p)
	if err != nil {
		return false, fmt.Errorf("verify snapshot: %w", err)
	}
	return has, nil
}

const verifyPattern = ".verify-*.db"

// staleAge is how old a scratch file must be before a later call removes it. No copy or check takes nearly that
// long, so a file this old was left by a process that died (a dyno killed mid-snapshot); on a docker volume it
// would otherwise stay forever.
const staleAge = 15 * time.Minute

// removeStale removes scratch files matching pattern in dir that are older than staleAge, with their side files.
func RemoveStale(dir, pattern string) {
	matches, _ := filepath.Glob(filepath.Join(dir, pattern))
	for _, m := range matches {
		if strings.HasSuffix(m, "-wal") || strings.HasSuffix(m, "-shm") || strings.HasSuffix(m, "-journal") {
			continue
		}
		if fi, err := os.Stat(m); err == nil && time.Since(fi.ModTime()) > staleAge {
			RemoveDB(m)
		}
	}
}

// RemoveDB removes a scratch database and the side files SQLite may have created next to it.
func RemoveDB(path string) {
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		_ = os.Remove(p)
	}
}
