package backup_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"path/filepath"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/services/backup"
	"github.com/blacksky-md/blacksky/services/backup/postgres"
	"github.com/blacksky-md/blacksky/services/backup/sqlite"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// database is where snapshots and leases live for one test: a PostgreSQL
// schema or a SQLite file, shared by every instance the test starts.
type database struct {
	kind string
	url  string // postgres
	path string // sqlite
}

func newDatabase(t testing.TB, kind string) database {
	t.Helper()
	if kind == "postgres" {
		return database{kind: kind, url: testdb.Postgres(t).URL}
	}
	return database{kind: kind, path: filepath.Join(t.TempDir(), "blacksky.db")}
}

func (d database) open(ctx context.Context) (backup.Store, error) {
	if d.kind == "postgres" {
		return postgres.Open(ctx, postgres.Options{URL: d.url, MaxConns: 5})
	}
	return sqlite.Open(ctx, d.path)
}

// mustOpen opens and migrates the database for direct inspection.
func (d database) mustOpen(t testing.TB) backup.Store {
	t.Helper()
	st, err := d.open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Migrate(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

var kinds = []string{"sqlite", "postgres"}

// instance is one running backup service with its own data dir and bus, as
// a dyno or container would have.
type instance struct {
	t       testing.TB
	cfg     *config.Config
	svc     *backup.Service
	nc      *nats.Conn
	subj    bus.Subjects
	clock   *clockwork.FakeClock
	cancel  context.CancelFunc
	done    chan error
	dataDir string
	name    string
	unit    string // the instance id its gateway would use
}

type instOpts struct {
	env      map[string]string
	dataDir  string
	name     string
	open     func(context.Context) (backup.Store, error)
	dbWait   time.Duration
	noWait   bool // do not wait for the restore to be done
	leaseTTL time.Duration
	retry    time.Duration
	logTo    func([]byte)                        // also receives every log line
	clock    *clockwork.FakeClock                // nil: its own
	bus      *bus.Server                         // nil: its own (a dyno's embedded NATS)
	outage   func(*slog.Logger) *dboutage.Outage // builds the outage filter on the instance's log; nil: the service's own
}

const session = "Test-Session"

func testEnv(dataDir string) map[string]string {
	return map[string]string{
		"SESSION_ID":       session,
		"DATA_DIR":         dataDir,
		"BACKUP_INTERVAL":  "60m",
		"BACKUP_RETENTION": "10",
		"SYNC_INTERVAL":    "0", // the full-snapshot pipeline; incremental tests turn it on
		"SHUTDOWN_TIMEOUT": "20s",
	}
}

func start(t testing.TB, db database, o instOpts) *instance {
	t.Helper()
	if o.dataDir == "" {
		o.dataDir = t.TempDir()
	}
	if o.name == "" {
		o.name = "i-" + randHex(4)
	}
	env := testEnv(o.dataDir)
	maps.Copy(env, o.env)
	cfg, err := config.Load(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	srv := o.bus
	if srv == nil {
		if srv, err = bus.StartServer(bus.ServerOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Shutdown)
	}
	log := logging.New(testWriter{t: t, also: o.logTo}, logging.Options{Level: cfg.LogLevel, Format: "text", Secrets: cfg.Secrets()})
	nc, err := srv.Connect("test-"+o.name, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	open := o.open
	if open == nil {
		open = db.open
	}
	clock := o.clock
	if clock == nil {
		clock = clockwork.NewFakeClock()
	}
	bcfg := backupConfig(cfg)
	bcfg.DBWait, bcfg.LeaseTTL, bcfg.StandbyRetry, bcfg.QueuePollInterval = o.dbWait, o.leaseTTL, o.retry, 50*time.Millisecond
	var outage *dboutage.Outage
	if o.outage != nil {
		outage = o.outage(log.With("instance", o.name))
	}
	svc, err := backup.New(backup.Options{Config: bcfg, NC: nc, Log: log.With("instance", o.name), Clock: clock,
		Instance: o.name, Open: open, Outage: outage})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{t: t, cfg: cfg, svc: svc, nc: nc, subj: bus.NewSubjects(session), clock: clock, cancel: cancel,
		done: make(chan error, 1), dataDir: o.dataDir, name: o.name, unit: bus.InstanceToken(o.name)}
	go func() { in.done <- svc.Run(ctx) }()
	t.Cleanup(func() { in.stop() })
	if !o.noWait {
		in.restoreReply(20 * time.Second)
	}
	return in
}

// stop cancels Run and waits for its graceful end.
func (in *instance) stop() error {
	in.t.Helper()
	in.cancel()
	select {
	case err := <-in.done:
		in.done <- err
		return err
	case <-time.After(30 * time.Second):
		in.t.Fatalf("%s: Run did not return after cancel", in.name)
		return nil
	}
}

func (in *instance) restoreReply(d time.Duration) bus.RestoreReply {
	in.t.Helper()
	var rep bus.RestoreReply
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var err error
	// Run subscribes in its own goroutine: no responders means not yet.
	testwait.For(in.t, d, in.name+": a session.restore responder", func() bool {
		err = bus.Request(ctx, in.nc, in.subj.SessionRestoreFor(in.unit), struct{}{}, &rep)
		return !errors.Is(err, nats.ErrNoResponders)
	})
	if err != nil {
		in.t.Fatalf("%s: session.restore: %v", in.name, err)
	}
	return rep
}

func (in *instance) backupNow(reason string) bus.BackupReply {
	in.t.Helper()
	var rep bus.BackupReply
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := bus.Request(ctx, in.nc, in.subj.BackupRequest(), bus.BackupRequest{Reason: reason}, &rep); err != nil {
		in.t.Fatalf("%s: backup.request: %v", in.name, err)
	}
	return rep
}

func (in *instance) sessionPath() string { return filepath.Join(in.dataDir, "session.db") }

// newStore creates a linked whatsmeow store of about size bytes in dir.
func newStore(t testing.TB, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "session.db")
	if err := wastore.Create(context.Background(), p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// write commits n numbered rows into the store, as the gateway would.
func write(t testing.TB, path string, n int) int64 {
	t.Helper()
	w, err := wastore.StartWriter(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	start := w.Last()
	testwait.For(t, 10*time.Second, "writes", func() bool { return w.Last() >= start+int64(n) })
	last, err := w.Stop()
	if err != nil {
		t.Fatal(err)
	}
	return last
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

type testWriter struct {
	t    testing.TB
	also func([]byte)
}

func (w testWriter) Write(p []byte) (int, error) {
	if w.also != nil {
		w.also(p)
	}
	w.t.Log(string(p))
	return len(p), nil
}

// steal takes the session's lease from whoever holds it, as a standby does
// after watching the row unchanged for a TTL.
func steal(t testing.TB, st backup.Store, holder string) {
	t.Helper()
	testwait.For(t, 10*time.Second, holder+" to take the lease", func() bool {
		seen, _, err := st.AcquireLease(context.Background(), session, holder, time.Now(), time.Hour, backup.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		_, ok, err := st.AcquireLease(context.Background(), session, holder, time.Now(), time.Hour, seen)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	})
}
