//go:build unix

package bus

import (
	"fmt"
	"os"
	"syscall"
)

// checkOwner refuses a bus.json that another user could have written: in a
// shared DATA_DIR (the image's /data is mode 1777) a planted file would
// send this user's NATS_TOKEN to a server of the planter's choosing.
func checkOwner(fi os.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if int(st.Uid) != os.Getuid() {
		return fmt.Errorf("owned by uid %d, not by this user (%d)", st.Uid, os.Getuid())
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("writable by others (mode %v)", fi.Mode().Perm())
	}
	return nil
}
