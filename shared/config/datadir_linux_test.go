package config_test

import (
	"errors"
	"github.com/blacksky-md/blacksky/internal/testdep"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// mountTmpfs mounts a tmpfs with flags and data at a new directory, or skips
// the test when this process may not mount (not root, no CAP_SYS_ADMIN).
func mountTmpfs(t *testing.T, flags uintptr, data string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", flags, data); err != nil {
		testdep.Missing(t, "cannot mount a tmpfs here (%v): needs root or CAP_SYS_ADMIN", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// A read-only mount stops root too: the case that used to retry "unable to
// open database file" forever.
func TestDataDirReadOnlyMount(t *testing.T) {
	dir := mountTmpfs(t, syscall.MS_RDONLY, "size=1m")
	checkRefused(t, dir, "read-only file system")
	checkRefused(t, filepath.Join(dir, "data"), "read-only file system")
}

func TestDataDirFullDisk(t *testing.T) {
	dir := mountTmpfs(t, 0, "size=256k")
	fill, err := os.Create(filepath.Join(dir, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	defer fill.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := fill.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the disk: %v", err)
			}
			break
		}
	}
	checkRefused(t, dir, "no space left on device")
}

// asOtherUser runs f with the effective uid of nobody when the test runs as
// root (permission bits do not bind root), and as is otherwise. The real and
// saved uid stay 0, so root comes back afterwards; Go applies setresuid to
// every thread of the process, so no test of this package may run in
// parallel with it (none calls t.Parallel).
func asOtherUser(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		f()
		return
	}
	const nobody = 65534
	if err := syscall.Setresuid(-1, nobody, -1); err != nil {
		testdep.Missing(t, "cannot take the uid of nobody (%v)", err)
	}
	defer func() {
		if err := syscall.Setresuid(-1, 0, -1); err != nil {
			panic("cannot return to root: " + err.Error())
		}
	}()
	f()
}
