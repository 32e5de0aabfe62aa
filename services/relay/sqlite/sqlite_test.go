package sqlite_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/sqlite"
	"github.com/blacksky-md/blacksky/services/relay/storetest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) relay.Store {
		s, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "blacksky.db"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}
