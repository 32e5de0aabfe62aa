package sqlite_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
	"github.com/blacksky-md/blacksky/services/backup/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) backup.Store {
		s, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "blacksky.db"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}
