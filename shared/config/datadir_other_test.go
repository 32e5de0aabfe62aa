//go:build !linux

package config_test

import (
	"github.com/blacksky-md/blacksky/internal/testdep"
	"os"
	"testing"
)

// asOtherUser: only Linux can drop to another uid here; root elsewhere skips.
func asOtherUser(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() == 0 {
		testdep.Missing(t, "running as root, which permission bits do not stop, and only Linux can drop to another uid here")
	}
	f()
}
