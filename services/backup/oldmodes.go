package backup

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
)

// narrowOldFiles makes what an older version left under DATA_DIR with
// wider modes its owner's only, once at start: the local fallback folder
// (0700) and its snapshots, and the session stores a restore kept aside
// (0600). They hold the session's keys (snapshots in plaintext without a
// key), and nothing else would narrow them before they are next written,
// which with the database up may be never. A file it cannot narrow is
// logged, not fatal: the service is no less safe running than stopped.
func (s *Service) narrowOldFiles() {
	dir := s.local.Dir
	paths := []string{s.sessionPath + ".replaced", s.sessionPath + ".corrupt"}
	err := chmodIfExists(dir, 0o700)
	if entries, rerr := os.ReadDir(dir); rerr == nil {
		for _, e := range entries {
			if e.Type().IsRegular() {
				paths = append(paths, filepath.Join(dir, e.Name()))
			}
		}
	} else if !errors.Is(rerr, fs.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	for _, p := range paths {
		err = errors.Join(err, chmodIfExists(p, sqlitefile.Mode))
	}
	if err != nil {
		s.log.Warn("cannot make older files under DATA_DIR readable by their owner only", "err", err)
	}
}

// chmodIfExists narrows path itself, never what a symbolic link there
// points at.
func chmodIfExists(path string, mode fs.FileMode) error {
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case st.Mode()&fs.ModeSymlink != 0 || st.Mode().Perm() == mode:
		return nil
	}
	return os.Chmod(path, mode)
}
