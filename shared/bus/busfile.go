package bus

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// BusFileName is the file in DATA_DIR where a process that embeds the bus
// on TCP says where it listens, so the CLI of the same user on the same
// machine finds it without any setup.
const BusFileName = "bus.json"

// BusFile is the content of $DATA_DIR/bus.json.
type BusFile struct {
	URL string `json:"url"` // no credentials in it
	// Token is the bots' credential when it was generated at start; empty
	// when the operator set NATS_TOKEN, which clients then take from their
	// own environment (it is not copied to disk).
	Token     string    `json:"token,omitempty"`
	PID       int       `json:"pid"`
	Session   string    `json:"session"`
	StartedAt time.Time `json:"started_at"`
}

// ErrStaleBusFile is a bus.json whose process is gone (it crashed before
// removing the file).
var ErrStaleBusFile = errors.New("stale: the process that wrote it is gone")

// WriteBusFile writes f to dir/bus.json atomically (a complete file or the
// old one, whatever the moment of a crash), readable by this user only.
func WriteBusFile(dir string, f BusFile) error {
	data, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".bus.json-*") // CreateTemp makes it 0600
	if err != nil {
		return fmt.Errorf("write %s: %w", BusFileName, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", BusFileName, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", BusFileName, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", BusFileName, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, BusFileName)); err != nil {
		return fmt.Errorf("write %s: %w", BusFileName, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// ReadBusFile reads dir/bus.json. A missing file is an error satisfying
// errors.Is(err, os.ErrNotExist); a file whose process is gone is
// ErrStaleBusFile.
func ReadBusFile(dir string) (BusFile, error) {
	var f BusFile
	path := filepath.Join(dir, BusFileName)
	fh, err := os.Open(path)
	if err != nil {
		return f, err
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return f, err
	}
	if err := checkOwner(fi); err != nil {
		return f, fmt.Errorf("%s: not trusted: %w", path, err)
	}
	data, err := io.ReadAll(io.LimitReader(fh, 64<<10))
	if err != nil {
		return f, err
	}
	if err := json.Unmarshal(data, &f); err != nil || f.URL == "" {
		return f, fmt.Errorf("%s: not a bus file", filepath.Join(dir, BusFileName))
	}
	if f.PID > 0 && !processAlive(f.PID) {
		return f, fmt.Errorf("%s (pid %d): %w", filepath.Join(dir, BusFileName), f.PID, ErrStaleBusFile)
	}
	return f, nil
}

// RemoveBusFile removes dir/bus.json if the process pid wrote it: a second
// process that took over the file keeps it.
func RemoveBusFile(dir string, pid int) error {
	data, err := os.ReadFile(filepath.Join(dir, BusFileName))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	var f BusFile
	if json.Unmarshal(data, &f) == nil && f.PID != pid {
		return nil
	}
	return os.Remove(filepath.Join(dir, BusFileName))
}

// processAlive reports whether pid names a running process. Where signal 0
// cannot tell (or the process belongs to another user), it says yes: the
// client then tries the address and names it if nothing answers.
func processAlive(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	err = p.Signal(syscall.Signal(0))
	return err == nil || !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, syscall.ESRCH)
}
