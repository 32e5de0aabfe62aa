package main

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// The split gateway and backup share DATA_DIR and start together: both must
// end up with the same instance id, and keep it across restarts.
func TestInstanceIDSharedThroughDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	const n = 8
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { ids[i], errs[i] = readOrCreateInstanceID(dir) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("process %d: %v", i, errs[i])
		}
		if ids[i] != ids[0] {
			t.Fatalf("ids differ: %q and %q", ids[0], ids[i])
		}
	}
	if err := bus.CheckInstance(ids[0]); err != nil {
		t.Fatal(err)
	}
	again, err := readOrCreateInstanceID(dir)
	if err != nil || again != ids[0] {
		t.Fatalf("after a restart: %q, %v; want %q", again, err, ids[0])
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("DATA_DIR holds %d files, want only %s", len(entries), instanceFile)
	}
	if err := os.WriteFile(filepath.Join(dir, instanceFile), []byte("bad id.with.dots\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readOrCreateInstanceID(dir); err == nil {
		t.Fatal("a damaged instance-id file was accepted")
	}
}
