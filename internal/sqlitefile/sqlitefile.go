// Package sqlitefile is how every SQLite file of ours is named and created:
// a file: URI that names the path exactly, and a file only its owner can read
// (a session store holds the device's keys).
package sqlitefile

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
)

// Mode is the mode of every database file we create, and of its -wal, -shm
// and -journal files.
const Mode fs.FileMode = 0o600

// URI returns the file: URI of the database at path with query parameters
// (modernc's _pragma, SQLite's mode). modernc hands the URI to SQLite with
// SQLITE_OPEN_URI, which decodes %XX and ends the path at '?' or '#': the path
// is escaped so that "%41", "?" and "#" in it name themselves.
func URI(path string, params url.Values) string {
	// Clean turns a leading "//" (a URI authority) into "/".
	u := url.URL{Scheme: "file", Opaque: (&url.URL{Path: filepath.Clean(path)}).EscapedPath(), RawQuery: params.Encode()}
	return u.String()
}

// Prepare makes the database at path and its side files readable by their
// owner only, whatever the umask and whoever created the folder (an image's
// /data is often mode 1777). It creates the database file with Mode when it
// is missing: SQLite creates -wal, -shm and -journal with the database
// file's own mode, so they follow. Files an older version created with a
// wider mode are narrowed.
func Prepare(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, Mode)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		if err := os.Chmod(p, Mode); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("restrict %s to its owner: %w", p, err)
		}
	}
	return nil
}
