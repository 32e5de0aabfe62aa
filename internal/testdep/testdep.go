// Package testdep is how tests meet a missing dependency (a database, a
// browser, root): skipped on a developer's machine that lacks it, a failure
// under CI=true, where .ci/run installs or starts everything the tests need.
package testdep

import (
	"fmt"
	"os"
	"testing"
)

// ChromiumPath is Debian's chromium, which the browser tests drive.
const ChromiumPath = "/usr/bin/chromium"

// Missing ends the test for want of a dependency: Fatal when CI=true, Skip
// otherwise. The message says what is missing and how to get it.
func Missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		tb.Fatal(msg + " (required when CI=true)")
		return
	}
	tb.Skip(msg + " (CI=true makes this a failure)")
}

// Chromium returns ChromiumPath, or ends the test through Missing when it
// is not installed.
func Chromium(tb testing.TB) string {
	tb.Helper()
	if _, err := os.Stat(ChromiumPath); err != nil {
		Missing(tb, "chromium not installed (%v): apt-get install -y chromium", err)
	}
	return ChromiumPath
}
