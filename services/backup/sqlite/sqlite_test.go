package sqlite_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
	"github.com/blacksky-md/blacksky/services/backup/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) backup.Store {
		s, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "blacksky.db"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

// The database is created at DATA_DIR exactly: "%41", "?" and "#" in the path
// are not read as URI syntax.
func TestOpenKeepsThePathExact(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data%41?mode=ro#x")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "blacksky.db")
	s, err := sqlite.Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Migrate(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Size() == 0 {
		t.Fatalf("database not at its path: %v", err)
	}
}
