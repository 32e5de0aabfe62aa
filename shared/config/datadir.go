package config

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
)

// probeSize is what CheckDataDir writes: enough that a full disk refuses it
// (a bare create can succeed on a disk with no free blocks).
const probeSize = 64 << 10

// CheckDataDir makes sure dir (DATA_DIR) exists and this process can create,
// write and sync a file in it, so a read-only mount, a folder owned by
// another user, a file in its place or a full disk stops the start with an
// *Error naming DATA_DIR, the path and the reason, instead of a store that
// retries "unable to open database file" forever. It tries for real rather
// than reading permission bits: root ignores those, a read-only mount does
// not.
func CheckDataDir(dir string) error {
	fail := func(reason string) error {
		return &Error{Var: "DATA_DIR", Accepts: "a directory this user can create and write files in", Got: strconv.Quote(dir) + " (" + reason + ")"}
	}
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return fail("it is a file, not a directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail("cannot create it: " + errReason(err))
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	probe := filepath.Join(dir, ".blacksky-probe-"+hex.EncodeToString(b[:]))
	f, err := os.OpenFile(probe, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fail("cannot create a file in it: " + errReason(err))
	}
	_, werr := f.Write(make([]byte, probeSize))
	if werr == nil {
		werr = f.Sync()
	}
	cerr := f.Close()
	rerr := os.Remove(probe)
	switch {
	case werr != nil:
		return fail("cannot write to it: " + errReason(werr))
	case cerr != nil:
		return fail("cannot write to it: " + errReason(cerr))
	case rerr != nil:
		return fail("cannot delete a file in it: " + errReason(rerr))
	}
	return nil
}

// errReason is the operating system's reason without the path, which the
// caller names once ("read-only file system", "permission denied", ...).
func errReason(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err.Error()
	}
	return fmt.Sprint(err)
}
