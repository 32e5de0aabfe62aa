package backup_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
)

func TestLocalFallback(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "backups")
	l := backup.Local{Dir: dir}
	if files, err := l.List(); err != nil || len(files) != 0 {
		t.Fatalf("missing dir: %v %v", files, err)
	}
	at := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	for i, reason := range []string{"scheduled", "restore_point", "manual", "shutdown", "paired"} {
		// The same instant each time: order must still follow the writes.
		if _, err := l.Write([]byte{byte(i)}, at, reason, fmt.Sprintf("%064d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	files, err := l.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != backup.LocalKeep {
		t.Fatalf("%d files; want the newest %d", len(files), backup.LocalKeep)
	}
	for i, want := range []string{"paired", "shutdown", "manual"} {
		if files[i].Reason != want || files[i].SHA256 != fmt.Sprintf("%064d", 4-i) {
			t.Fatalf("file %d = %+v; want %s", i, files[i], want)
		}
	}
	if b, _ := os.ReadFile(files[0].Path); len(b) != 1 || b[0] != 4 {
		t.Fatalf("newest holds %v", b)
	}
	// A reason with '_' parses back whole.
	if _, err := l.Write([]byte{9}, at, "restore_point", fmt.Sprintf("%064d", 9)); err != nil {
		t.Fatal(err)
	}
	if files, _ := l.List(); files[0].Reason != "restore_point" {
		t.Fatalf("reason = %q", files[0].Reason)
	}
}
