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
// asOtherUser.
func TestDataDirNotWritableByThisUser(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(dir, 0o700) })
	asOtherUser(t, func() { checkRefused(t, dir, "permission denied") })
}
