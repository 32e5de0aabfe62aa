package relay_test

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	_ "modernc.org/sqlite" // the test reaches into relay's SQLite file

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// exec runs one statement on the test's relay database directly, as a
// crash or River's rescuer would leave it.
func (d database) exec(t testing.TB, query string) int64 {
	t.Helper()
	ctx := context.Background()
	if d.kind == "postgres" {
		conn, err := pgx.Connect(ctx, d.url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		tag, err := conn.Exec(ctx, query)
		if err != nil {
			t.Fatal(err)
		}
		return tag.RowsAffected()
	}
	db, err := sql.Open("sqlite", "file:"+d.path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	res, err := db.ExecContext(ctx, query)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := res.RowsAffected()
	return n
}

// A queued send whose job is gone (deleted, or discarded by River's
// rescuer after a SIGKILL) gets a new job when relay starts: it goes out
// once, not never.
func TestQueuedSendWithoutALiveJobIsQueuedAgainAtStart(t *testing.T) {
	for _, kind := range kinds {
		for name, query := range map[string]string{
			"deleted":   `DELETE FROM river_job WHERE kind = 'blacksky_relay_send'`,
			"discarded": `UPDATE river_job SET state = 'discarded', finalized_at = CURRENT_TIMESTAMP WHERE kind = 'blacksky_relay_send'`,
		} {
			t.Run(kind+"/"+name, func(t *testing.T) {
				s := newSetup(t, kind)
				first := s.start(t)
				bot := s.bus.conn(t, bus.RoleBot)
				rep := send(t, bot, `{"to":"15551234567","text":"orphan","idempotency_key":"orphan","wait":false}`)
				if !rep.OK || !rep.Queued {
					t.Fatalf("queued send: %+v", rep)
				}
				first.stop(t)
				if n := s.db.exec(t, query); n != 1 {
					t.Fatalf("%d send jobs changed, want 1", n)
				}
				gw := startGateway(t, s.bus.nc)
				sent := collect(t, s.bus.nc, subj.MsgSent())
				s.start(t)
				testwait.For(t, 60*time.Second, "the orphaned send to go out", func() bool { return sent.len() >= 1 })
				if n := gw.count("orphan"); n != 1 {
					t.Fatalf("the gateway was asked %d times, want once", n)
				}
			})
		}
	}
}

// blacksky deliveries retry also queues again a send whose job was
// discarded while the send is still queued.
func TestRetryQueuesAgainASendWhoseJobWasDiscarded(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.backoff = time.Hour
	s.start(t)
	bot := s.bus.conn(t, bus.RoleBot)
	rep := send(t, bot, `{"to":"15551234567","text":"stuck","idempotency_key":"stuck","wait":false}`)
	if !rep.OK || !rep.Queued {
		t.Fatalf("queued send: %+v", rep)
	}
	// No gateway: the first attempt is snoozed (or fails) and the job waits; then
	// it is discarded, as River's rescuer does to a job whose worker died
	// on its last attempt.
	testwait.For(t, 20*time.Second, "the send job discarded", func() bool {
		return s.db.exec(t, `UPDATE river_job SET state = 'discarded', finalized_at = CURRENT_TIMESTAMP
			WHERE kind = 'blacksky_relay_send' AND state IN ('retryable', 'scheduled')`) == 1
	})
	gw := startGateway(t, s.bus.nc)
	sent := collect(t, s.bus.nc, subj.MsgSent())
	var rr bus.RelayRetryReply
	request(t, bot, subj.RelayRetry(), []byte(`{}`), &rr)
	if !rr.OK || rr.Retried != 1 {
		t.Fatalf("retry: %+v, want the send counted", rr)
	}
	testwait.For(t, 60*time.Second, "the send to go out", func() bool { return sent.len() >= 1 })
	if n := gw.count("stuck"); n != 1 {
		t.Fatalf("the gateway was asked %d times, want once", n)
	}
}
