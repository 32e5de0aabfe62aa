package sqlitefile_test

import (
	"database/sql"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
)

// A path with %41, '?' and '#' names exactly that file, and the database,
// its WAL and shared memory are 0600 under the usual umask.
func TestURIAndPrepareKeepThePathAndTheOwner(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "data%41?x=1#frag")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "store.db")
	if err := sqlitefile.Prepare(path); err != nil {
		t.Fatal(err)
	}
	q := url.Values{"_pragma": {"journal_mode(WAL)"}}
	db, err := sql.Open("sqlite", sqlitefile.URI(path, q))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t (x); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s: %v (the URI named another file)", p, err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s is %o; want 600", filepath.Base(p), st.Mode().Perm())
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "dataA")); err == nil {
		t.Error("%41 was decoded: a folder named dataA exists")
	}
	// A file an older version left 0644 is narrowed.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sqlitefile.Prepare(path); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("existing 0644 file left %o", st.Mode().Perm())
	}
}
