package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blacksky-md/blacksky/shared/config"
)

// checkRefused asserts that CheckDataDir refuses dir with a config error
// naming DATA_DIR, the path and the reason.
func checkRefused(t *testing.T, dir, reason string) {
	t.Helper()
	err := config.CheckDataDir(dir)
	if err == nil {
		t.Fatalf("CheckDataDir(%s) = nil, want an error", dir)
	}
	msg := err.Error()
	if !config.IsError(err) || !strings.Contains(msg, "DATA_DIR:") || !strings.Contains(msg, dir) || !strings.Contains(msg, reason) {
		t.Fatalf("error %q: want a config error naming DATA_DIR, %s and %q", msg, dir, reason)
	}
}

func TestDataDirUsable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data", "nested")
	if err := config.CheckDataDir(dir); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Fatalf("the probe left %v behind (%v)", entries, err)
	}
	if err := config.CheckDataDir(dir); err != nil {
		t.Fatalf("an existing directory: %v", err)
	}
}

func TestDataDirIsAFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	checkRefused(t, file, "is a file, not a directory")
	checkRefused(t, filepath.Join(file, "sub"), "not a directory")
}

// A directory another user owns: as root, the check runs with the
// effective uid of nobody (root bypasses permission bits), see
// asOtherUser. Its parent is open to all, so the check reaches the
// directory and fails to create the probe in it (t.TempDir's own folder is
// 0700: nobody could not even look into it, a different failure).
func TestDataDirNotWritableByThisUser(t *testing.T) {
	parent, err := os.MkdirTemp("", "blacksky-datadir-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(parent) })
	dir := filepath.Join(parent, "data")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{parent, dir} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if os.Geteuid() != 0 {
		// Without root the folder cannot belong to someone else: take the
		// write bit away from its owner instead.
		if err := os.Chmod(dir, 0o555); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Chmod(dir, 0o755) })
	}
	asOtherUser(t, func() { checkRefused(t, dir, "cannot create a file in it: permission denied") })
}
