package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// WriteFileAtomic writes data to path via a temp file in the same directory, fsync, rename, fsync of the directory:
// after a crash path holds either the old content or the new, never a mix.
//
// It also removes the target's stale -wal, -shm and -journal files before the rename. SQLite would replay a WAL or
// hot journal left by the previous database into the new file and corrupt it. They go before the rename, not
// after: a crash in between then leaves the old database without its WAL (about to be replaced anyway) rather than
// the new one with a foreign WAL. The caller must make sure nothing has the database open (the gateway opens its
// store only after restore).
func WriteFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: chmod: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := InstallDB(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// InstallDB puts the complete, fsynced database file tmp at path, removing the target's stale side files first
// (see WriteFileAtomic for why, and why before the rename). incr's restore uses it for a database it assembled on
// disk.
func InstallDB(tmp, path string) error {
	for _, side := range []string{"-wal", "-shm", "-journal"} {
		if err := os.Remove(path + side); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale %s: %w", side, err)
		}
	}
	return RenameDurable(tmp, path)
}

// RenameDurable renames a complete, fsynced file into place and fsyncs the directory, so that after a crash the
// target is either the old file or the new one, and a power loss cannot forget the new directory entry.
func RenameDurable(tmp, path string) error {
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// syncDir makes the rename durable: without it a power loss can forget the new directory entry.
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
