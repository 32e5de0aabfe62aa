package bus_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
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

func TestStripUserinfo(t *testing.T) {
	tests := map[string]string{
		"nats://127.0.0.1:4222":                       "nats://127.0.0.1:4222",
		"nats://tok@h:4222":                           "nats://h:4222",
		"nats://u:p%40ss@h:4222":                      "nats://h:4222",
		"tls://u:pw@a:4222, nats://tok2@b:4222":       "tls://a:4222,nats://b:4222",
		"nats://u:p@ss@h:4222/x?y=z":                  "nats://h:4222/x?y=z",
		"nats://tok@h1,nats://h2,nats://u:pass@h3:1/": "nats://h1,nats://h2,nats://h3:1/",
		"tok@h:4222":                                  "h:4222",
		"nats://u:S3c+retA/x@h1:4222":                 "nats://h1:4222",
		"nats://u:S3cretA@h1:4222,u:S3cretB@h2:bad":   "nats://h1:4222,h2:bad",
		"nats://u:a#b?c@h1":                           "nats://h1",
	}
	for in, want := range tests {
		if got := bus.StripUserinfo(in); got != want {
			t.Errorf("StripUserinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzReadBusFile: whatever lies in DATA_DIR/bus.json, reading it never
// panics, and a file it accepts names an address.
func FuzzReadBusFile(f *testing.F) {
	f.Add([]byte(`{"url":"nats://127.0.0.1:4222","token":"t","pid":0}`))
	f.Add([]byte(`{"url":""}`))
	f.Add([]byte(`not json`))
	f.Add([]byte(`{"url":"nats://h","pid":-5}`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, bus.BusFileName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		bf, err := bus.ReadBusFile(dir)
		if err == nil && bf.URL == "" {
			t.Fatalf("accepted %q without an address", data)
		}
	})
}

// A bus.json that others could have written is not trusted: it could send
// this user's token to another server.
func TestBusFileWritableByOthersIsRefused(t *testing.T) {
	dir := t.TempDir()
	if err := bus.WriteBusFile(dir, bus.BusFile{URL: "nats://127.0.0.1:4567", PID: os.Getpid()}); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, bus.BusFileName), 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.ReadBusFile(dir); err == nil || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("bus.json writable by others: err = %v, want refused", err)
	}
}

// nats.go's errors quote the URL, or one server of it with the nats:// it
// added; the error Dial returns shows neither server's credentials.
func TestConnectErrorsShowNoCredentials(t *testing.T) {
	url := "nats://u:S3cretA@h1:4222,u:S3cretB@h2:bad"
	_, err := bus.Dial(url, bus.Credential{}, "test", time.Second, logging.Discard())
	if err == nil {
		t.Fatal("Dial of an unparsable URL succeeded")
	}
	if msg := err.Error(); strings.Contains(msg, "S3cret") || !strings.Contains(msg, "h2:bad") {
		t.Fatalf("error %q shows a password or hides the server", msg)
	}
}
