package postgres_test

import (
	"context"
	"strings"
	"testing"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/postgres"
	"github.com/blacksky-md/blacksky/services/backup/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) backup.Store {
		db := testdb.Postgres(t)
		s, err := postgres.Open(context.Background(), postgres.Options{URL: db.URL, MaxConns: 10})
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestOpenBadURLHidesPassword(t *testing.T) {
	_, err := postgres.Open(context.Background(), postgres.Options{URL: "postgres://u:s3cretpw@127.0.0.1:1/x?sslmode=disable"})
	if err == nil {
		t.Fatal("open of a closed port succeeded")
	}
	if got := err.Error(); strings.Contains(got, "s3cretpw") {
		t.Fatalf("error shows the password: %s", got)
	}
}
