package health

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/shared/logging"
)

type snapshotTestArgs struct {
	Reason string `json:"reason"`
}

func (snapshotTestArgs) Kind() string { return "health_test_snapshot" }

func TestRiverUI(t *testing.T) {
	t.Parallel()
	dsn := testdb.Postgres(t).URL
	ctx := context.Background()

	// River's tables and one job, as the backup service would leave them.
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatal(err)
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: logging.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Insert(ctx, snapshotTestArgs{Reason: "manual"}, nil); err != nil {
		t.Fatal(err)
	}

	ui, err := NewRiverUI(dsn, 2, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	b := setup(t, func(o *Options) { o.RiverUI = ui })

	code, body, _ := b.get(t, "/riverui/", nil)
	if code != 401 || !strings.Contains(body, `value="/riverui/"`) {
		t.Fatalf("GET /riverui/ without token = %d, want 401 with a sign-in form back to /riverui/: %s", code, body)
	}
	if code, _, _ := b.get(t, "/riverui/api/jobs?state=available", bearer("wrong")); code != 401 {
		t.Fatalf("River UI API with a wrong token = %d", code)
	}
	code, body, _ = b.get(t, "/riverui/", bearer(testToken))
	if code != 200 || !strings.Contains(strings.ToLower(body), "<html") {
		t.Fatalf("GET /riverui/ with token = %d: %.300s", code, body)
	}
	code, body, _ = b.get(t, "/riverui/api/jobs?state=available", map[string]string{"Cookie": cookieName + "=" + b.svc.auth.issue()})
	if code != 200 || !strings.Contains(body, "health_test_snapshot") {
		t.Fatalf("GET /riverui/api/jobs = %d: %.500s", code, body)
	}
}

func TestRiverUIAbsentWithoutPostgres(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	code, body, _ := b.get(t, "/riverui/", bearer(testToken))
	if code != 404 || !strings.Contains(body, "PostgreSQL") {
		t.Fatalf("GET /riverui/ without River UI = %d %q, want 404 naming PostgreSQL", code, body)
	}
}

func TestNewRiverUIRejectsBadURLWithoutEchoingIt(t *testing.T) {
	t.Parallel()
	_, err := NewRiverUI("postgres://u:hunter2@%zz/db", 1, logging.Discard())
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("NewRiverUI(bad url) = %v, want an error without the password", err)
	}
}
