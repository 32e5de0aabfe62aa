package bus_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestBusFileIsPrivateAndRoundTrips(t *testing.T) {
	dir := t.TempDir()
	want := bus.BusFile{URL: "nats://127.0.0.1:4567", Token: "tok", PID: os.Getpid(), Session: "S", StartedAt: time.Now().UTC().Truncate(time.Second)}
	if err := bus.WriteBusFile(dir, want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, bus.BusFileName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("bus.json mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := bus.ReadBusFile(dir)
	if err != nil || got != want {
		t.Fatalf("read back %+v, %v; want %+v", got, err, want)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left beside bus.json: %v", entries)
	}
}

// A bus.json left by a process that crashed does not send clients to an
// address nobody serves, or worse, to another server.
func TestBusFileOfADeadProcessIsStale(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := bus.WriteBusFile(dir, bus.BusFile{URL: "nats://127.0.0.1:4567", PID: cmd.Process.Pid}); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.ReadBusFile(dir); !errors.Is(err, bus.ErrStaleBusFile) {
		t.Fatalf("bus.json of dead pid %d: err = %v, want stale", cmd.Process.Pid, err)
	}
	if _, err := bus.ReadBusFile(t.TempDir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing bus.json: err = %v", err)
	}
}

// A process removes only the bus.json it wrote: a second process that
// overwrote it keeps its own.
func TestRemoveBusFileKeepsAnotherProcesssFile(t *testing.T) {
	dir := t.TempDir()
	if err := bus.WriteBusFile(dir, bus.BusFile{URL: "nats://127.0.0.1:1", PID: os.Getpid() + 1}); err != nil {
		t.Fatal(err)
	}
	if err := bus.RemoveBusFile(dir, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, bus.BusFileName)); err != nil {
		t.Fatalf("another process's bus.json was removed: %v", err)
	}
	if err := bus.RemoveBusFile(dir, os.Getpid()+1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, bus.BusFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("own bus.json kept: %v", err)
	}
}
