//go:build !linux

package config_test

import (
	"os"
	"testing"
)

// asOtherUser: only Linux can drop to another uid here; root elsewhere skips.
func asOtherUser(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() == 0 {
		t.Skip("running as root, which permission bits do not stop")
	}
	f()
}
