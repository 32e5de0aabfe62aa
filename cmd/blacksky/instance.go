package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// instanceFile holds the instance id of the split roles, in DATA_DIR.
const instanceFile = "instance-id"

// unit is the instance id this process's gateway and backup share: their
// restore handshake and conn.standby carry it, so with a shared NATS no
// other instance acts on them (CONTRACT section 3).
//
// In run both live in this process: the process's own name, unique per
// process (two preboot dynos share a DYNO name, never a process). The split
// gateway and backup roles are the processes that share a DATA_DIR (backup
// reads and restores the gateway's session.db, so they must): the id is kept
// there, created by whichever starts first.
func (a *app) unit() (string, error) {
	if a.role == "run" {
		return bus.InstanceToken(a.instance), nil
	}
	return readOrCreateInstanceID(a.cfg.DataDir)
}

// readOrCreateInstanceID returns the id in dir/instance-id, creating it
// when missing. Two processes starting at once agree: the file appears
// whole (hard link of a finished temporary file) or not at all, and the
// loser reads the winner's.
func readOrCreateInstanceID(dir string) (string, error) {
	path := filepath.Join(dir, instanceFile)
	if id, err := readInstanceID(path); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return id, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("DATA_DIR: %w", err)
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	id := "i-" + hex.EncodeToString(b[:])
	tmp, err := os.CreateTemp(dir, instanceFile+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("DATA_DIR: instance id: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.WriteString(id + "\n")
	if err := errors.Join(werr, tmp.Sync(), tmp.Close()); err != nil {
		return "", fmt.Errorf("DATA_DIR: instance id: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("DATA_DIR: instance id: %w", err)
	}
	return readInstanceID(path)
}

func readInstanceID(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if err := bus.CheckInstance(id); err != nil {
		return "", fmt.Errorf("%s: %w (delete the file to get a new one)", path, err)
	}
	return id, nil
}
