package backup

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// LocalKeep is how many snapshots the local fallback keeps.
const LocalKeep = 3

// localTimeFormat is fixed-width so names sort by time.
const localTimeFormat = "20060102T150405.000000000Z"

// Local is the fallback directory $DATA_DIR/backups: the newest snapshots as
// files, written atomically, for when the database is unreachable.
type Local struct {
	Dir  string
	Keep int // zero: LocalKeep
}

// LocalFile is one fallback snapshot.
type LocalFile struct {
	Path      string
	CreatedAt time.Time
	Reason    string
	SHA256    string
}

// Write stores payload as a new file and prunes to Keep.
func (l Local) Write(payload []byte, at time.Time, reason, sha string) (LocalFile, error) {
	if err := os.MkdirAll(l.Dir, 0o700); err != nil {
		return LocalFile{}, fmt.Errorf("local fallback: %w", err)
	}
	// Ours whoever made it (an older version, an operator's mkdir): the
	// files hold the session, plaintext without a key.
	if err := os.Chmod(l.Dir, 0o700); err != nil {
		return LocalFile{}, fmt.Errorf("local fallback: %w", err)
	}
	// Names order the files; the newest must sort first even if the clock
	// stepped back (or a fake clock stands still).
	at = at.UTC()
	if files, err := l.List(); err == nil && len(files) > 0 && !at.After(files[0].CreatedAt) {
		at = files[0].CreatedAt.Add(time.Nanosecond)
	}
	f := LocalFile{CreatedAt: at, Reason: reason, SHA256: sha}
	f.Path = filepath.Join(l.Dir, f.CreatedAt.Format(localTimeFormat)+"_"+reason+"_"+sha+".bsnap")
	if err := snapshot.WriteFileAtomic(f.Path, payload, 0o600); err != nil {
		return LocalFile{}, fmt.Errorf("local fallback: %w", err)
	}
	keep := l.Keep
	if keep == 0 {
		keep = LocalKeep
	}
	files, err := l.List()
	if err != nil {
		return f, err
	}
	for _, old := range files[min(keep, len(files)):] {
		_ = os.Remove(old.Path)
	}
	return f, nil
}

// List returns the fallback snapshots, newest first. A missing directory is
// an empty list; files with names we did not write are ignored.
func (l Local) List() ([]LocalFile, error) {
	entries, err := os.ReadDir(l.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local fallback: %w", err)
	}
	var out []LocalFile
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".bsnap") {
			continue
		}
		// <time>_<reason>_<sha256>.bsnap; a reason may itself hold '_'.
		stem := strings.TrimSuffix(name, ".bsnap")
		ts, rest, ok1 := strings.Cut(stem, "_")
		i := strings.LastIndexByte(rest, '_')
		if !ok1 || i < 0 {
			continue
		}
		at, err := time.Parse(localTimeFormat, ts)
		if err != nil {
			continue
		}
		out = append(out, LocalFile{Path: filepath.Join(l.Dir, name), CreatedAt: at, Reason: rest[:i], SHA256: rest[i+1:]})
	}
	slices.SortFunc(out, func(a, b LocalFile) int { return b.CreatedAt.Compare(a.CreatedAt) })
	return out, nil
}
