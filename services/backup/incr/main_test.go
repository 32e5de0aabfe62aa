package incr

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind (a Watcher not stopped, a database not closed).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
