package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
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

// A standby hears of a released lease at once (LISTEN/NOTIFY), only for its
// own session.
func TestWatchLeasesHearsReleases(t *testing.T) {
	db := testdb.Postgres(t)
	ctx := context.Background()
	s, err := postgres.Open(ctx, postgres.Options{URL: db.URL, MaxConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	released := make(chan struct{}, 4)
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.WatchLeases(wctx, "mine", func() { released <- struct{}{} }) }()
	now := time.Now()
	for _, session := range []string{"mine", "other"} {
		if _, ok, err := s.AcquireLease(ctx, session, "holder", now, time.Minute, backup.Lease{}); !ok || err != nil {
			t.Fatalf("acquire %s: %v %v", session, ok, err)
		}
	}
	// The listener may not be listening yet: release until it hears one.
	testwait.For(t, 10*time.Second, "a release notification", func() bool {
		if err := s.ReleaseLease(ctx, "other", "holder"); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.AcquireLease(ctx, "mine", "holder", now, time.Minute, backup.Lease{}); err != nil {
			t.Fatal(err)
		}
		if err := s.ReleaseLease(ctx, "mine", "holder"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-released:
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
	stop()
	if err := <-done; err != nil {
		t.Fatalf("WatchLeases after cancel: %v", err)
	}
}
