package snapshot

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/blacksky-md/blacksky/internal/wastore"
)

// A store under a path with "%41", "?" and "#" is read where it is, not at
// the path SQLite would make of the URI syntax.
func TestReadConsistentKeepsThePathExact(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data%41?mode=ro#x")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "session.db")
	if err := wastore.Create(t.Context(), path, 64<<10); err != nil {
		t.Fatal(err)
	}
	plain, err := ReadConsistent(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(t.Context(), path); err != nil {
		t.Fatal(err)
	}
	has, err := Verify(t.Context(), plain, dir)
	if err != nil || !has {
		t.Fatalf("Verify = %v, %v; want the linked device", has, err)
	}
}
