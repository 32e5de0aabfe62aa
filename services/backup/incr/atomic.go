package incr

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// renameDurable renames a complete, fsynced file into place and fsyncs the directory, so that after a crash the
// target is either the old file or the new one, and a power loss cannot forget the new directory entry.
func renameDurable(tmp, path string) error {
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// installDB puts the assembled database tmp (already fsynced) at path. SQLite would replay a -wal or hot -journal
// left by the previous database into the new file and corrupt it, so they are removed first; before the rename, so
// that a crash in between leaves the old database without its WAL (about to be replaced) rather than the new one
// with a foreign WAL. The same order as snapshot.WriteFileAtomic, for a file that is already on disk.
func installDB(tmp, path string) error {
	for _, side := range []string{"-wal", "-shm", "-journal"} {
		if err := os.Remove(path + side); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale %s: %w", side, err)
		}
	}
	return renameDurable(tmp, path)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir for fsync: %w", err)
	}
	serr := d.Sync()
	cerr := d.Close()
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("fsync dir: %w", err)
	}
	return nil
}
