package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// herokuEnv is what a web dyno of an app made by the Deploy button sees:
// app.json's values and generated secrets, the add-on's DATABASE_URL,
// Heroku's PORT and DYNO. DATA_DIR stands for the dyno's empty disk.
func herokuEnv(t *testing.T, dbURL, dataDir string, port int, generated map[string]string) env {
	t.Helper()
	raw, err := os.ReadFile("../app.json")
	if err != nil {
		t.Fatal(err)
	}
	var app struct {
		Env map[string]struct {
			Value     *string `json:"value"`
			Generator string  `json:"generator"`
		} `json:"env"`
	}
	if err := json.Unmarshal(raw, &app); err != nil {
		t.Fatalf("app.json: %v", err)
	}
	e := env{"DATABASE_URL": dbURL, "PORT": strconv.Itoa(port), "DYNO": "web.1"}
	for name, v := range app.Env {
		switch {
		case v.Generator == "secret":
			if generated[name] == "" {
				generated[name] = randomHex(t, 32) // Heroku's generator: 64 hex characters
			}
			e[name] = generated[name]
		case v.Value != nil:
			e[name] = *v.Value
		}
	}
	e["DATA_DIR"] = dataDir
	return e
}

func waitHealthz(t *testing.T, p *proc, port int) {
	t.Helper()
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/healthz"
	waitFor(t, 20*time.Second, "/healthz on $PORT", func() bool {
		if !p.running() {
			t.Fatalf("%s exited early: %v", p.name, p.err)
		}
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// TestHerokuDyno runs the Heroku setup: the release phase (`blacksky
// migrate`), then `blacksky run` as the one web dyno with app.json's
// environment. A SIGTERM (the daily restart) ends within SHUTDOWN_TIMEOUT
// with a shutdown snapshot, and the next dyno, on an empty disk, comes back
// with the same session. Both with app.json's continuous replication and
// with SYNC_INTERVAL=0, the full-snapshot path an operator can still
// choose (and the one an app deployed before replication keeps until it
// takes app.json's new variable).
func TestHerokuDyno(t *testing.T) {
	t.Run("continuous replication", func(t *testing.T) { testHerokuDyno(t, nil) })
	t.Run("SYNC_INTERVAL=0", func(t *testing.T) { testHerokuDyno(t, []string{"SYNC_INTERVAL", "0"}) })
}

func testHerokuDyno(t *testing.T, override []string) {
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	generated := map[string]string{}

	disk1 := t.TempDir()
	if err := wastore.Create(t.Context(), filepath.Join(disk1, "session.db"), 0); err != nil {
		t.Fatalf("create session store: %v", err)
	}
	port := freePort(t)
	// The add-on's DATABASE_URL carries a password.
	dynoDB, dbPassword := passwordRole(t, db)
	e := herokuEnv(t, dynoDB, disk1, port, generated).with(override...)
	secrets := []string{generated["NATS_TOKEN"], generated["HEALTH_TOKEN"], generated["SESSION_ENCRYPTION_KEY"]}
	if dbPassword != "" {
		secrets = append(secrets, dbPassword)
	}

	run(t, bin, e, "migrate") // release phase
	web := start(t, bin, "web.1", e, "run")
	waitHealthz(t, web, port)
	statusURL := "http://127.0.0.1:" + strconv.Itoa(port) + "/status"
	// Up: backup has started (the lease is held), the gateway has its
	// store open and is trying WhatsApp, health serves.
	waitFor(t, 30*time.Second, "/status: backup ok, the gateway past the restore", func() bool {
		if !web.running() {
			t.Fatalf("web.1 exited: %v", web.err)
		}
		d, code, err := getStatus(statusURL, generated["HEALTH_TOKEN"])
		if err != nil || code != http.StatusOK {
			return false
		}
		g, b, h := d.Services["gateway"], d.Services["backup"], d.Services["health"]
		switch g.State {
		case "", bus.StateStarting, bus.StateWaitingRestore, bus.StateStandby:
			return false
		}
		return b.State == bus.StateOK && h.State != ""
	})

	took := web.stop(t, 30*time.Second) // Heroku's SIGKILL comes at 30 s
	t.Logf("web.1 stopped %s after SIGTERM", took.Round(time.Millisecond))
	shutdownTimeout, err := time.ParseDuration(e["SHUTDOWN_TIMEOUT"])
	if err != nil {
		t.Fatal(err)
	}
	if took > shutdownTimeout {
		t.Errorf("stopping took %s, more than SHUTDOWN_TIMEOUT (%s)", took, shutdownTimeout)
	}
	checkLogs(t, secrets, web)
	session := e["SESSION_ID"]
	last := checkShutdownRow(t, snapshots(t, db.URL, session), web, filepath.Join(disk1, "session.db"))
	if last.Point != (e["SYNC_INTERVAL"] != "0") {
		t.Errorf("with SYNC_INTERVAL=%q the newest stored backup is %+v", e["SYNC_INTERVAL"], last)
	}

	// The next day's dyno: same config vars and database, an empty disk.
	disk2 := t.TempDir()
	port2 := freePort(t)
	web2 := start(t, bin, "web.1 (next dyno)", herokuEnv(t, dynoDB, disk2, port2, generated).with(override...), "run")
	restored := filepath.Join(disk2, "session.db")
	var sha string
	waitFor(t, 30*time.Second, "the session restored on the new dyno", func() bool {
		if !web2.running() {
			t.Fatalf("the new dyno exited: %v", web2.err)
		}
		if _, err := os.Stat(restored); err != nil {
			return false
		}
		sha = storeHash(t, restored, last)
		return true
	})
	if sha != last.SHA256 {
		t.Errorf("restored session.db hash %s, want the shutdown backup's %s", sha, last.SHA256)
	}
	if got, want := deviceJID(t, restored), wastore.DeviceJID.String(); got != want {
		t.Errorf("restored device %s, want %s", got, want)
	}
	waitHealthz(t, web2, port2)
	web2.stop(t, 30*time.Second)
	checkLogs(t, secrets, web2)
}

// TestHerokuPrebootOverlap: during a deploy with preboot, the new dyno
// starts while the old one still runs. The new one must wait in standby,
// not open a second socket, and take over the session the old one saved in
// its shutdown snapshot (CONTRACT guarantee 2).
func TestHerokuPrebootOverlap(t *testing.T) {
	db := testdb.Postgres(t)
	bin := buildBinary(t)
	generated := map[string]string{}

	oldDisk, newDisk := t.TempDir(), t.TempDir()
	if err := wastore.Create(t.Context(), filepath.Join(oldDisk, "session.db"), 0); err != nil {
		t.Fatalf("create session store: %v", err)
	}
	oldPort, newPort := freePort(t), freePort(t)
	oldEnv := herokuEnv(t, db.URL, oldDisk, oldPort, generated)
	run(t, bin, oldEnv, "migrate")
	oldDyno := start(t, bin, "web.1 (old release)", oldEnv, "run")
	waitState(t, oldDyno, oldPort, generated["HEALTH_TOKEN"], func(g, b string) bool {
		return b == bus.StateOK && g != bus.StateStarting && g != bus.StateWaitingRestore && g != bus.StateStandby
	})

	newDyno := start(t, bin, "web.1 (new release)", herokuEnv(t, db.URL, newDisk, newPort, generated), "run")
	// Heroku names the new dyno web.1 too: same DYNO, a different process.
	var newBackup string
	waitState(t, newDyno, newPort, generated["HEALTH_TOKEN"], func(g, b string) bool {
		newBackup = b
		return b == bus.StateStandby || b == bus.StateOK
	})
	if newBackup != bus.StateStandby {
		t.Fatalf("the new dyno's backup is %q while the old dyno still runs: both hold the session lease "+
			"and open a socket. Both are DYNO=web.1, so the lease holder (the instance name) must also be unique per process", newBackup)
	}
	if _, err := os.Stat(filepath.Join(newDisk, "session.db")); err == nil {
		t.Fatal("the new dyno wrote a session store while the old one holds the session")
	}

	oldDyno.stop(t, 30*time.Second)
	last := checkShutdownRow(t, snapshots(t, db.URL, oldEnv["SESSION_ID"]), oldDyno, filepath.Join(oldDisk, "session.db"))

	restored := filepath.Join(newDisk, "session.db")
	var sha string
	waitFor(t, 30*time.Second, "the new dyno to take over the session", func() bool {
		if !newDyno.running() {
			t.Fatalf("the new dyno exited: %v", newDyno.err)
		}
		if _, err := os.Stat(restored); err != nil {
			return false
		}
		sha = storeHash(t, restored, last)
		return true
	})
	if sha != last.SHA256 {
		t.Errorf("the new dyno restored hash %s, want the old dyno's shutdown backup %s", sha, last.SHA256)
	}
	waitState(t, newDyno, newPort, generated["HEALTH_TOKEN"], func(g, b string) bool {
		return b == bus.StateOK && g != bus.StateWaitingRestore && g != bus.StateStandby
	})
	newDyno.stop(t, 30*time.Second)
	checkLogs(t, []string{generated["NATS_TOKEN"], generated["HEALTH_TOKEN"], generated["SESSION_ENCRYPTION_KEY"]}, oldDyno, newDyno)
}

// waitState polls a dyno's /status until ok(gateway state, backup state).
func waitState(t *testing.T, p *proc, port int, token string, ok func(gateway, backup string) bool) {
	t.Helper()
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/status"
	var last statusDoc
	defer func() {
		if t.Failed() {
			t.Logf("%s: last /status: gateway=%q backup=%q", p.name, last.Services["gateway"].State, last.Services["backup"].State)
		}
	}()
	waitFor(t, 40*time.Second, p.name+" to reach the wanted states", func() bool {
		if !p.running() {
			t.Fatalf("%s exited: %v", p.name, p.err)
		}
		d, code, err := getStatus(url, token)
		if err != nil || code != http.StatusOK {
			return false
		}
		last = d
		return ok(d.Services["gateway"].State, d.Services["backup"].State)
	})
}
