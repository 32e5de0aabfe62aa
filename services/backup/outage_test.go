package backup_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/postgres"
)

// failCounter is the outage filter as the pool's tracer, counting the
// acquires that failed: how often River (and backup) tried the database.
type failCounter struct {
	*dboutage.Outage
	failed atomic.Int64
}

func (c *failCounter) TraceAcquireEnd(ctx context.Context, p *pgxpool.Pool, d pgxpool.TraceAcquireEndData) {
	if d.Err != nil {
		c.failed.Add(1)
	}
	c.Outage.TraceAcquireEnd(ctx, p, d)
}

// lines is a log that a test reads while the service writes it.
type lines struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lines) add(p []byte) { l.mu.Lock(); l.b.Write(p); l.mu.Unlock() }
func (l *lines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// While PostgreSQL is away River fails to fetch every queue's jobs several
// times a second: backup's log says so once (repeats held back), and once
// more when the database answers again, counting them.
func TestDatabaseOutageIsLoggedOnceNotOnEveryRiverFetch(t *testing.T) {
	db := proxiedPostgres(t)
	log := &lines{}
	tracer := &failCounter{}
	start(t, db.via, instOpts{
		logTo: log.add,
		outage: func(l *slog.Logger) *dboutage.Outage {
			tracer.Outage = dboutage.New(l, "backup")
			return tracer.Outage
		},
		open: func(ctx context.Context) (backup.Store, error) {
			return postgres.Open(ctx, postgres.Options{URL: db.via.url, MaxConns: 5, Tracer: tracer})
		},
	})
	db.proxy.Down()
	from := tracer.failed.Load()
	// River polls each queue every 50 ms here: 40 failed acquires is
	// River trying for a while, not one unlucky call.
	testwait.For(t, 30*time.Second, "River to try the database 40 times", func() bool { return tracer.failed.Load()-from >= 40 })
	down := log.String()
	if got := strings.Count(down, "Error fetching jobs"); got > 1 {
		t.Fatalf("River's fetch error logged %d times during the outage, want at most once:\n%.3000s", got, down)
	}
	if !strings.Contains(down, "not logged until") {
		t.Fatalf("no line says the repeats are held back:\n%.3000s", down)
	}
	db.proxy.Up()
	testwait.For(t, 30*time.Second, "a line saying the database is back", func() bool {
		return strings.Contains(log.String(), "backup: the database answers again")
	})
}
