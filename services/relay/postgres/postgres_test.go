package postgres_test

import (
	"context"
	"strings"
	"testing"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/postgres"
	"github.com/blacksky-md/blacksky/services/relay/storetest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) relay.Store {
		s, err := postgres.Open(context.Background(), postgres.Options{URL: testdb.Postgres(t).URL, MaxConns: 10})
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestOpenBadURLHidesPassword(t *testing.T) {
	_, err := postgres.Open(context.Background(), postgres.Options{URL: "postgres://u:s3cretpw@127.0.0.1:1/x?sslmode=disable"})
	if err == nil || strings.Contains(err.Error(), "s3cretpw") {
		t.Fatalf("open of a closed port: %v", err)
	}
}
