package e2e

import (
	"database/sql"
	"encoding/json"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testproxy"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// marks counts the rows touchStore committed into a session store.
func marks(t *testing.T, path string) int {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM e2e_marks`).Scan(&n); err != nil {
		t.Fatalf("count the writes in %s: %v", path, err)
	}
	return n
}

// A backup-now answered while PostgreSQL is unreachable says so (stored
// "local", exit code 3), and once the database is back the snapshot reaches
// it by itself, although no lease renewal ever failed to notice the outage:
// a SIGKILL 2-30 s later loses nothing, the next dyno restores that write.
// With continuous replication the local fallback holds points and the
// catch-up is a fresh base in the database; with SYNC_INTERVAL=0 it is the
// local full snapshot itself.
func TestLocalOnlyBackupReachesTheDatabaseBeforeAKill(t *testing.T) {
	t.Run("continuous replication", func(t *testing.T) { testLocalOnlyBackupReachesTheDatabase(t, nil) })
	t.Run("SYNC_INTERVAL=0", func(t *testing.T) { testLocalOnlyBackupReachesTheDatabase(t, []string{"SYNC_INTERVAL", "0"}) })
}

func testLocalOnlyBackupReachesTheDatabase(t *testing.T, override []string) {
	pg := testdb.Postgres(t)
	u, err := url.Parse(pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := testproxy.Start(t, u.Host)
	u.Host = proxy.Addr()
	bin := buildBinary(t)
	generated := map[string]string{}

	disk := t.TempDir()
	store := filepath.Join(disk, "session.db")
	if err := wastore.Create(t.Context(), store, 0); err != nil {
		t.Fatal(err)
	}
	touchStore(t, store)
	port, natsPort := freePort(t), freePort(t)
	e := herokuEnv(t, u.String(), disk, port, generated).with("NATS_LISTEN", "127.0.0.1:"+strconv.Itoa(natsPort)).with(override...)
	points := e["SYNC_INTERVAL"] != "0"
	run(t, bin, e, "migrate")
	dyno := start(t, bin, "web.1", e, "run")
	waitState(t, dyno, port, generated["HEALTH_TOKEN"], func(g, b string) bool { return b == bus.StateOK })
	client := e.with("NATS_URL", "nats://127.0.0.1:"+strconv.Itoa(natsPort))
	run(t, bin, client, "backup-now")

	// The database goes away for a moment; a write, and a backup meanwhile.
	touchStore(t, store)
	want := marks(t, store)
	proxy.Down()
	stdout, stderr, code := runCode(t, bin, client, "backup-now", "--timeout", "20s")
	var rep bus.BackupReply
	if err := json.Unmarshal([]byte(strings.TrimSpace(stdout)), &rep); err != nil {
		t.Fatalf("backup-now printed %q (%v); stderr %s", stdout, err, stderr)
	}
	if code != 3 || !rep.OK || rep.Stored != bus.StoredLocal || !strings.Contains(stderr, "local fallback only") {
		t.Fatalf("backup-now with the database down: exit %d, reply %+v, stderr %q; want exit 3, ok, stored local, said so", code, rep, stderr)
	}
	if rep.Snapshot == nil || rep.Snapshot.ID != 0 || rep.Snapshot.SHA256 == "" {
		t.Fatalf("backup-now answered from the local fallback with %+v; want the store's hash and id 0", rep.Snapshot)
	}
	proxy.Up()
	wait := 2*time.Second + rand.N(3*time.Second) // within the 2-30 s, at its hard end
	t.Logf("SIGKILL %s after the database came back", wait)
	// The scenario itself: the kill comes this long after the outage,
	// whatever the process is doing then.
	<-time.NewTimer(wait).C
	if err := dyno.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-dyno.done
	killedAt := time.Now()
	// What the database holds now is all the next dyno can restore.
	rows := snapshots(t, pg.URL, e["SESSION_ID"])
	if len(rows) == 0 {
		t.Fatal("nothing in the database after the kill")
	}
	newest := rows[len(rows)-1]
	if newest.Point != points {
		t.Fatalf("with SYNC_INTERVAL=%q the newest stored backup is %+v", e["SYNC_INTERVAL"], newest)
	}

	// The next dyno: an empty disk, the same database. The killed one's
	// lease is still there: it is taken over after one lease TTL.
	disk2 := t.TempDir()
	port2 := freePort(t)
	next := start(t, bin, "web.1 (next)", herokuEnv(t, pg.URL, disk2, port2, generated).with(override...), "run")
	restored := filepath.Join(disk2, "session.db")
	var sha string
	waitFor(t, 40*time.Second, "the next dyno's restore", func() bool {
		if !next.running() {
			t.Fatalf("the next dyno exited: %v", next.err)
		}
		if _, err := os.Stat(restored); err != nil {
			return false
		}
		// Read at once: the gateway opens the store right after.
		sha = storeHash(t, restored, newest)
		return true
	})
	if sha != newest.SHA256 {
		t.Errorf("the next dyno restored hash %s, want the newest stored backup %s's %s", sha, newest.CLIID(), newest.SHA256)
	}
	if took := time.Since(killedAt); took > 15*time.Second {
		t.Errorf("the next dyno restored %s after the kill; want a crash takeover within 15 s", took)
	} else {
		t.Logf("crash takeover: restored %s after the kill", took.Round(100*time.Millisecond))
	}
	if got := marks(t, restored); got != want {
		t.Fatalf("the next dyno restored %d writes, want %d: the backup answered from the local fallback never reached the database", got, want)
	}
	// The database holds what backup-now answered: the local full snapshot
	// itself, or (points) a fresh base taken as the database came back,
	// which is the same database, so the same hash, as nothing wrote to the
	// store in between (WhatsApp is unreachable here).
	var shipped bool
	for _, r := range rows {
		shipped = shipped || r.SHA256 == rep.Snapshot.SHA256
	}
	if !shipped {
		t.Errorf("no database row holds the store backup-now answered from the local fallback (%s): %+v", rep.Snapshot.SHA256, rows)
	}
	next.stop(t, 30*time.Second)
	checkLogs(t, []string{generated["NATS_TOKEN"], generated["HEALTH_TOKEN"], generated["SESSION_ENCRYPTION_KEY"]}, dyno, next)
}

// busWatch records, from a shared NATS server, every heartbeat state per
// service and instance, and every conn.standby.
type busWatch struct {
	mu       sync.Mutex
	states   map[string][]string // service/instance -> states seen, in order
	standbys []bus.ConnEvent
}

func watchBus(t *testing.T, nc *nats.Conn, subj bus.Subjects) *busWatch {
	t.Helper()
	w := &busWatch{states: map[string][]string{}}
	sub, err := nc.Subscribe(subj.HeartbeatAll(), func(m *nats.Msg) {
		var hb bus.Heartbeat
		if json.Unmarshal(m.Data, &hb) != nil {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		k := hb.Service + "/" + hb.Instance
		if s := w.states[k]; len(s) == 0 || s[len(s)-1] != hb.State {
			w.states[k] = append(s, hb.State)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	sub2, err := nc.Subscribe(subj.Conn(bus.ConnStandby), func(m *nats.Msg) {
		var ev bus.ConnEvent
		if json.Unmarshal(m.Data, &ev) == nil {
			w.mu.Lock()
			w.standbys = append(w.standbys, ev)
			w.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub2.Unsubscribe() })
	return w
}

// instance returns the instance of service whose states so far satisfy ok.
func (w *busWatch) instance(service string, ok func(states []string) bool) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	for k, s := range w.states {
		if svc, inst, _ := strings.Cut(k, "/"); svc == service && ok(s) {
			return inst
		}
	}
	return ""
}

func (w *busWatch) statesOf(service, instance string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.states[service+"/"+instance]...)
}

func has(states []string, want ...string) bool {
	for _, s := range states {
		for _, w := range want {
			if s == w {
				return true
			}
		}
	}
	return false
}

// Two dynos of a preboot overlap on one external NATS server and one
// PostgreSQL: the new dyno's backup announces standby for its own instance
// the whole time, and the active dyno's gateway never takes that for its
// own (it never goes standby or asks for a restore again); the new dyno
// opens its store only after the old one's shutdown snapshot, with every
// write the old one made.
// handoverMargin is what a loaded CI machine may add to the 1 s hand-over.
const handoverMargin = 3 * time.Second

// logTime returns the time of the first line of p's log with message msg
// (and, when flag is set, that attribute true); zero when none.
func logTime(t *testing.T, p *proc, msg, flag string) time.Time {
	t.Helper()
	for _, line := range strings.Split(p.out.String(), "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		var when string
		if strings.HasPrefix(line, "{") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != msg || (flag != "" && rec[flag] != true) {
				continue
			}
			when, _ = rec["time"].(string)
		} else {
			if !strings.Contains(line, "msg=\""+msg+"\"") || (flag != "" && !strings.Contains(line, " "+flag+"=true")) {
				continue
			}
			for _, f := range strings.Fields(line) {
				if v, ok := strings.CutPrefix(f, "time="); ok {
					when = v
				}
			}
		}
		at, err := time.Parse(time.RFC3339Nano, when)
		if err != nil {
			t.Fatalf("%s: log line without a readable time: %q", p.name, line)
		}
		return at
	}
	return time.Time{}
}

func TestPrebootOverlapOnSharedNATS(t *testing.T) {
	pg := testdb.Postgres(t)
	bin := buildBinary(t)
	generated := map[string]string{}
	token := randomHex(t, 24)
	// The external server as docs/heroku.md configures it: the sample
	// configuration's roles, reading both secrets from its environment.
	generated["NATS_INTERNAL_SECRET"] = randomHex(t, 32)
	t.Setenv("NATS_TOKEN", token)
	t.Setenv("NATS_INTERNAL_SECRET", generated["NATS_INTERNAL_SECRET"])
	opts, err := natsserver.ProcessConfigFile("../deploy/nats-server.conf")
	if err != nil {
		t.Fatal(err)
	}
	opts.Host, opts.Port, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, true, true
	ns, err := natsserver.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo("bot", token))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	oldDisk, newDisk := t.TempDir(), t.TempDir()
	oldStore := filepath.Join(oldDisk, "session.db")
	if err := wastore.Create(t.Context(), oldStore, 0); err != nil {
		t.Fatal(err)
	}
	oldPort, newPort := freePort(t), freePort(t)
	envFor := func(disk string, port int) env {
		return herokuEnv(t, pg.URL, disk, port, generated).with("NATS_URL", ns.ClientURL(), "NATS_TOKEN", token)
	}
	oldEnv := envFor(oldDisk, oldPort)
	w := watchBus(t, nc, bus.NewSubjects(oldEnv["SESSION_ID"]))
	run(t, bin, oldEnv, "migrate")
	oldDyno := start(t, bin, "web.1 (old release)", oldEnv, "run")
	waitState(t, oldDyno, oldPort, generated["HEALTH_TOKEN"], func(g, b string) bool {
		return b == bus.StateOK && g != bus.StateStarting && g != bus.StateWaitingRestore && g != bus.StateStandby
	})
	live := func(s []string) bool {
		return len(s) > 0 && !has(s[len(s)-1:], bus.StateStarting, bus.StateWaitingRestore, bus.StateStandby)
	}
	var oldGateway string
	waitFor(t, 20*time.Second, "the old dyno's gateway heartbeat", func() bool {
		oldGateway = w.instance(bus.ServiceGateway, live)
		return oldGateway != ""
	})
	touchStore(t, oldStore)

	newDyno := start(t, bin, "web.1 (new release)", envFor(newDisk, newPort), "run")
	var newBackup string
	waitFor(t, 30*time.Second, "the new dyno's backup in standby", func() bool {
		newBackup = w.instance(bus.ServiceBackup, func(s []string) bool { return has(s, bus.StateStandby) })
		return newBackup != ""
	})
	// The overlap lasts longer than a lease TTL (10 s), with writes on the
	// old dyno: the new one keeps watching a lease that stays alive.
	overlap := time.NewTimer(15 * time.Second)
	pace := time.NewTicker(time.Second)
	defer pace.Stop()
	for busy := true; busy; {
		touchStore(t, oldStore)
		if _, err := os.Stat(filepath.Join(newDisk, "session.db")); err == nil {
			t.Fatal("the new dyno opened a session store while the old one holds the session")
		}
		if s := w.statesOf(bus.ServiceBackup, newBackup); s[len(s)-1] != bus.StateStandby {
			t.Fatalf("the new dyno's backup left standby (%v) while the old dyno holds the session", s)
		}
		select {
		case <-overlap.C:
			busy = false
		case <-pace.C:
		}
	}
	want := marks(t, oldStore)
	w.mu.Lock()
	standbys := append([]bus.ConnEvent(nil), w.standbys...)
	w.mu.Unlock()
	if len(standbys) == 0 {
		t.Fatal("the new dyno's backup never announced standby: the test saw no overlap")
	}
	for _, ev := range standbys {
		if ev.Instance == "" || ev.Instance == bus.InstanceToken(oldGateway) {
			t.Fatalf("conn.standby during the overlap names instance %q; want the new dyno's, never the old one's (%q)", ev.Instance, oldGateway)
		}
	}

	oldDyno.stop(t, 30*time.Second)
	if strings.Contains(oldDyno.out.String(), "lost the session lease") {
		t.Fatal("the old dyno's gateway closed its socket for a lost lease during the overlap")
	}
	if s := w.statesOf(bus.ServiceGateway, oldGateway); has(s, bus.StateStandby) || strings.Count(strings.Join(s, ","), bus.StateWaitingRestore) > 1 {
		t.Fatalf("the old dyno's gateway went through %v: it took the new dyno's standby for its own", s)
	}
	releasedAt := logTime(t, oldDyno, "session lease released", "")
	if releasedAt.IsZero() {
		t.Fatal("the old dyno did not log that it released the session lease")
	}
	checkShutdownRow(t, snapshots(t, pg.URL, oldEnv["SESSION_ID"]), oldDyno, oldStore)
	restored := filepath.Join(newDisk, "session.db")
	stoppedAt := time.Now()
	waitFor(t, 20*time.Second, "the new dyno to take over", func() bool {
		if !newDyno.running() {
			t.Fatalf("the new dyno exited: %v", newDyno.err)
		}
		_, err := os.Stat(restored)
		return err == nil
	})
	t.Logf("the new dyno restored %s after the old one exited", time.Since(stoppedAt).Round(10*time.Millisecond))
	// The clean hand-over, end to end: the new dyno's restore is done within
	// a second of the old one's release (CONTRACT guarantee 2), plus a margin
	// for a loaded CI machine. Both times come from the two processes' logs
	// on this one machine's clock.
	var restoredAt time.Time
	waitFor(t, 10*time.Second, "the new dyno's restore in its log", func() bool {
		restoredAt = logTime(t, newDyno, "session store ready", "restored")
		return !restoredAt.IsZero()
	})
	handover := restoredAt.Sub(releasedAt)
	t.Logf("hand-over: the new dyno restored %s after the old one logged the lease released", handover.Round(time.Millisecond))
	if handover > time.Second+handoverMargin {
		t.Fatalf("the new dyno restored %s after the old one released the lease; want within 1 s (+%s margin)", handover, handoverMargin)
	}
	if got := marks(t, restored); got != want {
		t.Fatalf("the new dyno restored %d writes, want all %d of the old dyno", got, want)
	}
	waitState(t, newDyno, newPort, generated["HEALTH_TOKEN"], func(g, b string) bool {
		return b == bus.StateOK && g != bus.StateWaitingRestore && g != bus.StateStandby
	})
	newDyno.stop(t, 30*time.Second)
	checkLogs(t, []string{token, generated["HEALTH_TOKEN"], generated["SESSION_ENCRYPTION_KEY"]}, oldDyno, newDyno)
}
