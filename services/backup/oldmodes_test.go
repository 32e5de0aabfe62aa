package backup_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
)

// A DATA_DIR an older version left readable by all (backups/ 0755, its
// snapshots and the stores a restore kept aside 0644) is narrowed when the
// backup service starts, with the database up: nothing waits for the next
// local write or restore to do it.
func TestOlderFilesAreNarrowedAtStart(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	newStore(t, dataDir, 64<<10)
	backups := filepath.Join(dataDir, "backups")
	local := backup.Local{Dir: backups}
	f, err := local.Write([]byte("an older snapshot"), time.Now(), "manual", strings.Repeat("0", 64))
	if err != nil {
		t.Fatal(err)
	}
	notes := filepath.Join(backups, "notes.txt")
	aside := []string{filepath.Join(dataDir, "session.db.replaced"), filepath.Join(dataDir, "session.db.corrupt")}
	for _, p := range append([]string{notes}, aside...) {
		if err := os.WriteFile(p, []byte("an older store"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{f.Path, notes, aside[0], aside[1]} {
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(backups, 0o755); err != nil {
		t.Fatal(err)
	}

	db := newDatabase(t, "sqlite")
	in := start(t, db, instOpts{dataDir: dataDir})
	if rep := in.restoreReply(20 * time.Second); !rep.OK {
		t.Fatalf("restore = %+v", rep)
	}
	wantMode(t, backups, 0o700)
	for _, p := range []string{f.Path, notes, aside[0], aside[1]} {
		wantMode(t, p, 0o600)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
}
