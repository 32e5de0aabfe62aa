package backup_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/blacksky-md/blacksky/services/backup"
)

// wantMode fails unless path has mode perm.
func wantMode(t *testing.T, path string, perm os.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Errorf("%v", err)
		return
	}
	if st.Mode().Perm() != perm {
		t.Errorf("%s is %o; want %o", filepath.Base(path), st.Mode().Perm(), perm)
	}
}

// Everything the backup service creates under DATA_DIR is its owner's only,
// under the usual umask and in a folder someone else made wide open:
// blacksky.db and its WAL files, backups/ and its snapshots, and the session
// stores a restore keeps aside.
func TestFilesUnderDataDirAreOwnerOnly(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dataDir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dataDir, 0o777); err != nil {
		t.Fatal(err)
	}
	// An older version (or an operator) made backups/ readable by all.
	if err := os.Mkdir(filepath.Join(dataDir, "backups"), 0o755); err != nil {
		t.Fatal(err)
	}
	path := newStore(t, dataDir, 128<<10)
	db := database{kind: "sqlite", path: filepath.Join(dataDir, "blacksky.db")}
	in := start(t, db, instOpts{dataDir: dataDir})
	if rep := in.backupNow("manual"); !rep.OK {
		t.Fatalf("backup-now = %+v", rep)
	}
	for _, p := range []string{db.path, db.path + "-wal", db.path + "-shm"} {
		wantMode(t, p, 0o600)
	}
	wantMode(t, filepath.Join(dataDir, "backups"), 0o700)
	files, err := backup.Local{Dir: filepath.Join(dataDir, "backups")}.List()
	if err != nil || len(files) == 0 {
		t.Fatalf("local fallback: %v, %v", files, err)
	}
	for _, f := range files {
		wantMode(t, f.Path, 0o600)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}

	// A restore over a store an older version left 0644 keeps it aside 0600.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	r := &backup.Restorer{Store: db.mustOpen(t), Session: session, SessionPath: path,
		Local: backup.Local{Dir: filepath.Join(dataDir, "backups")}, TmpDir: dataDir, Log: discard()}
	if res, err := r.Restore(context.Background(), 0); err != nil || !res.Restored {
		t.Fatalf("restore = %+v, %v", res, err)
	}
	wantMode(t, path, 0o600)
	wantMode(t, path+".replaced", 0o600)

	// A damaged store with nothing to restore from is moved aside 0600.
	empty := t.TempDir()
	damaged := filepath.Join(empty, "session.db")
	if err := os.WriteFile(damaged, []byte("not a database, but long enough to look like one"), 0o644); err != nil {
		t.Fatal(err)
	}
	r = &backup.Restorer{Session: session, SessionPath: damaged, Local: backup.Local{Dir: filepath.Join(empty, "backups")},
		TmpDir: empty, Log: discard()}
	if _, err := r.RestoreOnStart(context.Background()); err != nil {
		t.Fatal(err)
	}
	wantMode(t, damaged+".corrupt", 0o600)
}
