package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	_ "modernc.org/sqlite" // the pure-Go "sqlite" driver, to touch and read session stores

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.Every(t, timeout, 50*time.Millisecond, what, cond) // each check is a request or a query
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// freePort asks the kernel for a free loopback port. Another process could
// take it before ours binds it; on loopback in a test that is rare enough.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// built is the binary, built once for every test of the package.
var built struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		_ = os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildBinary builds cmd/blacksky once: as the Dockerfile does (static,
// CGO_ENABLED=0), or with -race when the test itself runs under -race.
func buildBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		built.dir, built.err = os.MkdirTemp("", "blacksky-e2e-")
		if built.err != nil {
			return
		}
		gobin, err := exec.LookPath("go")
		if err != nil {
			gobin = "/usr/local/go/bin/go"
		}
		built.path = filepath.Join(built.dir, "blacksky")
		args := []string{"build", "-o", built.path, "-ldflags", "-X main.version=e2e"}
		cgo := "CGO_ENABLED=0"
		if raceEnabled {
			args, cgo = append(args, "-race"), "CGO_ENABLED=1"
		}
		cmd := exec.Command(gobin, append(args, "github.com/blacksky-md/blacksky/cmd/blacksky")...)
		cmd.Env = append(os.Environ(), cgo)
		if b, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("go build ./cmd/blacksky: %w\n%s", err, b)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.path
}

// proc is one running blacksky process.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *testlog.Buffer
	done chan struct{}
	err  error // set before done closes
}

// env is a process environment: only what we give it, so nothing of the
// test's own environment (DATABASE_URL, NATS_URL...) leaks in.
type env map[string]string

func (e env) with(kv ...string) env {
	out := env{}
	for k, v := range e {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

func (e env) list() []string {
	l := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range e {
		l = append(l, k+"="+v)
	}
	return l
}

func start(t *testing.T, bin, name string, e env, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, out: &testlog.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = e.list()
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- output of %s ---\n%s", name, tail(p.out.String(), 6000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (p *proc) stop(t *testing.T, timeout time.Duration) time.Duration {
	t.Helper()
	began := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM %s: %v", p.name, err)
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %s of SIGTERM", p.name, timeout)
	}
	if p.err != nil {
		t.Fatalf("%s exited with %v after SIGTERM, want 0", p.name, p.err)
	}
	return time.Since(began)
}

// checkLogs: no data race, and no secret in any log line (CONTRACT
// guarantee 6).
func checkLogs(t *testing.T, secrets []string, procs ...*proc) {
	t.Helper()
	for _, p := range procs {
		out := p.out.String()
		if out == "" {
			t.Errorf("%s wrote no log at all", p.name)
		}
		if strings.Contains(out, "WARNING: DATA RACE") {
			t.Errorf("the race detector found a data race in %s", p.name)
		}
		for _, s := range secrets {
			if strings.Contains(out, s) {
				t.Errorf("%s's log contains a secret (%d characters)", p.name, len(s))
			}
		}
	}
}

// run runs a one-shot command to its end and wants exit code 0.
func run(t *testing.T, bin string, e env, args ...string) string {
	t.Helper()
	stdout, stderr, code := runCode(t, bin, e, args...)
	if code != 0 {
		t.Fatalf("blacksky %s: exit code %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, stdout, tail(stderr, 4000))
	}
	return stdout
}

// runCode runs a one-shot command and returns its output and exit code.
func runCode(t *testing.T, bin string, e env, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = e.list()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("blacksky %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errb.String(), code
}

// heartbeats keeps the latest heartbeat of each service.
type heartbeats struct {
	mu   sync.Mutex
	last map[string]bus.Heartbeat
}

func watchHeartbeats(t *testing.T, nc *nats.Conn, subj bus.Subjects) *heartbeats {
	t.Helper()
	h := &heartbeats{last: map[string]bus.Heartbeat{}}
	sub, err := nc.Subscribe(subj.HeartbeatAll(), func(m *nats.Msg) {
		var hb bus.Heartbeat
		if json.Unmarshal(m.Data, &hb) != nil {
			return
		}
		h.mu.Lock()
		h.last[hb.Service] = hb
		h.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return h
}

func (h *heartbeats) get(service string) (bus.Heartbeat, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	hb, ok := h.last[service]
	return hb, ok
}

// restoreReplies records the backup service's answers to P.session.restore.
// They travel to the gateway's reply inbox; with the token, any client may
// listen on _INBOX.> and see them.
type restoreReplies struct {
	mu  sync.Mutex
	all []bus.RestoreReply
}

func watchRestores(t *testing.T, nc *nats.Conn) *restoreReplies {
	t.Helper()
	r := &restoreReplies{}
	sub, err := nc.Subscribe("_INBOX.>", func(m *nats.Msg) {
		var raw map[string]json.RawMessage
		if json.Unmarshal(m.Data, &raw) != nil {
			return
		}
		if _, ok := raw["restored"]; !ok {
			return
		}
		var rr bus.RestoreReply
		if json.Unmarshal(m.Data, &rr) == nil {
			r.mu.Lock()
			r.all = append(r.all, rr)
			r.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return r
}

func (r *restoreReplies) list() []bus.RestoreReply {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bus.RestoreReply(nil), r.all...)
}

// statusDoc is the part of GET /status this test reads (CONTRACT section 4).
type statusDoc struct {
	Session  string `json:"session"`
	Detail   string `json:"detail"`
	Services map[string]struct {
		State    string `json:"state"`
		AgeMS    *int64 `json:"age_ms"`
		Instance string `json:"instance"`
		Fresh    bool   `json:"fresh"`
	} `json:"services"`
	WhatsApp struct {
		State string `json:"state"`
		JID   string `json:"jid"`
	} `json:"whatsapp"`
}

func getStatus(url, token string) (statusDoc, int, error) {
	var doc statusDoc
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return doc, 0, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return doc, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return doc, resp.StatusCode, err
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return doc, resp.StatusCode, fmt.Errorf("status body %q: %w", tail(string(body), 300), err)
	}
	return doc, resp.StatusCode, nil
}

// passwordRole gives the test database a login role with a password and
// returns a URL that connects as it, so the password can be looked for in
// logs and /status (CONTRACT guarantee 6). The role may create tables in
// the test's schema only; it is dropped at cleanup, before the schema.
// When the test database's user may not create roles, it returns the URL
// unchanged and an empty password.
func passwordRole(t *testing.T, db testdb.Database) (dbURL, password string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, db.URL)
	if err != nil {
		t.Fatalf("connect to the test database: %v", err)
	}
	defer conn.Close(context.Background())
	role, password := "e2e_"+randomHex(t, 6), randomHex(t, 24)
	// Identifiers and the password are hex: nothing to quote.
	if _, err := conn.Exec(ctx, "CREATE ROLE "+role+" LOGIN PASSWORD '"+password+"'"); err != nil {
		t.Logf("no password role (%v): the database password is not among the secrets looked for", err)
		return db.URL, ""
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, db.URL)
		if err != nil {
			t.Logf("drop role %s: %v", role, err)
			return
		}
		defer c.Close(context.Background())
		// DROP OWNED: the tables the role created in the test's schema.
		if _, err := c.Exec(ctx, "DROP OWNED BY "+role+" CASCADE"); err != nil {
			t.Logf("drop owned by %s: %v", role, err)
		}
		if _, err := c.Exec(ctx, "DROP ROLE "+role); err != nil {
			t.Logf("drop role %s: %v", role, err)
		}
	})
	if _, err := conn.Exec(ctx, "GRANT USAGE, CREATE ON SCHEMA "+db.Schema+" TO "+role); err != nil {
		t.Fatalf("grant on schema %s: %v", db.Schema, err)
	}
	u, err := url.Parse(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(role, password)
	return u.String(), password
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// touchStore commits one row into a session store, as WhatsApp traffic
// would, so the next snapshot has something new to store.
func touchStore(t *testing.T, path string) {
	t.Helper()
	db, err := sql.Open("sqlite", wastore.DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS e2e_marks (n INTEGER PRIMARY KEY, at TEXT NOT NULL)`); err != nil {
		t.Fatalf("touch session store: %v", err)
	}
	if _, err := db.Exec(`INSERT INTO e2e_marks (at) VALUES (?)`, time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
		t.Fatalf("touch session store: %v", err)
	}
}

// deviceJID reads the linked device's JID from a session store.
func deviceJID(t *testing.T, path string) string {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var jid string
	if err := db.QueryRow(`SELECT jid FROM whatsmeow_device LIMIT 1`).Scan(&jid); err != nil {
		t.Fatalf("read the device of %s: %v", path, err)
	}
	return jid
}

// service is one blacksky service of docker-compose.yml: the arguments of
// its command and its resolved environment.
type service struct {
	args []string
	env  env
}

// composeTopology loads docker-compose.yml as `docker compose` does, with
// dotenv as the content of .env, and returns the blacksky services
// (gateway, backup, health, relay).
func composeTopology(t *testing.T, dotenv map[string]string) map[string]service {
	t.Helper()
	var list []string
	for k, v := range dotenv {
		list = append(list, k+"="+v)
	}
	opts, err := cli.NewProjectOptions([]string{"../docker-compose.yml"}, cli.WithWorkingDirectory(".."), cli.WithEnv(list))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("load docker-compose.yml: %v", err)
	}
	out := map[string]service{}
	for _, name := range []string{"gateway", "backup", "health", "relay"} {
		s, ok := p.Services[name]
		if !ok {
			t.Fatalf("docker-compose.yml has no %s service", name)
		}
		if len(s.Command) < 2 || s.Command[0] != "blacksky" {
			t.Fatalf("%s command = %q, want blacksky <role>", name, s.Command)
		}
		e := env{}
		for k, v := range s.Environment {
			if v != nil {
				e[k] = *v
			}
		}
		out[name] = service{args: s.Command[1:], env: e}
	}
	return out
}

// TestSplitTopology is docker-compose.yml without docker: gateway (with the
// embedded NATS on TCP and a token), backup and health as three processes
// of the real binary, on a real PostgreSQL and one shared DATA_DIR.
func TestSplitTopology(t *testing.T) {
	began := time.Now()
	db := testdb.Postgres(t) // first: without a database (and CI unset) there is nothing to build for
	bin := buildBinary(t)
	t.Logf("built the binary (race=%v) in %s", raceEnabled, time.Since(began).Round(time.Millisecond))

	dataDir := t.TempDir()
	sessionPath := filepath.Join(dataDir, "session.db")
	ctx := context.Background()
	// A linked-looking store: backup refuses to store one without a device.
	if err := wastore.Create(ctx, sessionPath, 0); err != nil {
		t.Fatalf("create session store: %v", err)
	}

	session := "E2E-" + randomHex(t, 4)
	subj := bus.NewSubjects(session)
	natsToken, healthToken, key := randomHex(t, 32), randomHex(t, 32), randomHex(t, 32)
	internalSecret := randomHex(t, 32)
	secrets := []string{natsToken, healthToken, key, internalSecret}
	// The processes connect as a role with a password, as under compose.
	procDB, dbPassword := passwordRole(t, db)
	if dbPassword != "" {
		secrets = append(secrets, dbPassword)
	}
	natsAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	natsURL := "nats://" + natsAddr
	httpPort := freePort(t)
	statusURL := fmt.Sprintf("http://127.0.0.1:%d/status", httpPort)

	// The services as docker-compose.yml defines them, with .env holding the
	// four secrets; then what differs outside Docker: loopback instead of
	// the compose network, temporary folders, the test database, free ports.
	svcs := composeTopology(t, map[string]string{
		"NATS_TOKEN": natsToken, "NATS_INTERNAL_SECRET": internalSecret, "HEALTH_TOKEN": healthToken, "SESSION_ENCRYPTION_KEY": key,
		"POSTGRES_PASSWORD": randomHex(t, 32), // the compose database's; DATABASE_URL is replaced below
	})
	local := func(name, dir string, port int) env {
		e := svcs[name].env.with(
			"SESSION_ID", session, // isolates this run's subjects, rows and lease
			"DATA_DIR", dir,
			"DATABASE_URL", procDB,
			"PORT", strconv.Itoa(port),
			"LOG_LEVEL", "debug",
			"SHUTDOWN_TIMEOUT", "15s",
		)
		if _, ok := e["NATS_LISTEN"]; ok {
			e["NATS_LISTEN"] = natsAddr
		}
		if _, ok := e["NATS_URL"]; ok {
			e["NATS_URL"] = natsURL
		}
		return e
	}
	// One-shot commands run as `docker compose exec backup blacksky ...`.
	base := local("backup", dataDir, httpPort)
	syncOn := base["SYNC_INTERVAL"] != "0"
	if !syncOn {
		t.Fatal("docker-compose.yml turns continuous replication off by default; this test covers its default")
	}

	// The Heroku release phase, and what compose's backup does at start.
	run(t, bin, base, "migrate")
	run(t, bin, base, "migrate") // idempotent

	// Compose's start order: backup, gateway, health. Backup's NATS client
	// retries until the gateway's embedded server is up.
	backup := start(t, bin, "backup", local("backup", dataDir, httpPort), svcs["backup"].args...)
	gateway := start(t, bin, "gateway", local("gateway", dataDir, httpPort), svcs["gateway"].args...)
	health := start(t, bin, "health", local("health", dataDir, httpPort), svcs["health"].args...)

	nc, err := bus.Connect(natsURL, natsToken, "e2e", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("connect with the token: %v", err)
	}
	t.Cleanup(nc.Close)
	beats := watchHeartbeats(t, nc, subj)

	t.Run("all three services beat over TCP NATS", func(t *testing.T) {
		waitFor(t, 20*time.Second, "heartbeats of gateway, backup and health", func() bool {
			for _, p := range []*proc{backup, gateway, health} {
				if !p.running() {
					t.Fatalf("%s exited early: %v", p.name, p.err)
				}
			}
			_, g := beats.get("gateway")
			_, b := beats.get("backup")
			_, h := beats.get("health")
			return g && b && h
		})
	})

	t.Run("a client without the token is refused", func(t *testing.T) {
		for _, tok := range []string{"", "wrong-" + natsToken[:8]} {
			opts := []nats.Option{nats.Timeout(3 * time.Second), nats.MaxReconnects(0)}
			if tok != "" {
				opts = append(opts, nats.Token(tok))
			}
			c, err := nats.Connect(natsURL, opts...)
			if err == nil {
				c.Close()
				t.Fatalf("connected with token %q", tok)
			}
			if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization") {
				t.Errorf("token %q: refused with %v, want an authorization error", tok, err)
			}
		}
	})

	t.Run("status shows the three services", func(t *testing.T) {
		var doc statusDoc
		waitFor(t, 20*time.Second, "/status listing gateway, backup and health", func() bool {
			d, code, err := getStatus(statusURL, healthToken)
			if err != nil || code != http.StatusOK {
				return false
			}
			doc = d
			for _, s := range []string{"gateway", "backup", "health"} {
				if sd, ok := d.Services[s]; !ok || sd.State == "" || sd.Instance == "" {
					return false
				}
			}
			return true
		})
		if doc.Session != session {
			t.Errorf("status session = %q, want %q", doc.Session, session)
		}
		instances := map[string]bool{}
		for name, s := range doc.Services {
			instances[s.Instance] = true
			t.Logf("status: %s state=%s instance=%s", name, s.State, s.Instance)
		}
		if len(instances) < 3 {
			t.Errorf("services report %d distinct instances, want 3 processes", len(instances))
		}
		// Without the token: states only.
		pub, code, err := getStatus(statusURL, "")
		if err != nil || code != http.StatusOK {
			t.Fatalf("public /status: %d %v", code, err)
		}
		if len(pub.Services) < 3 || pub.WhatsApp.JID != "" {
			t.Errorf("public /status = %+v, want the states and no JID", pub)
		}
	})

	t.Run("/pair wants HEALTH_TOKEN", func(t *testing.T) {
		pairURL := fmt.Sprintf("http://127.0.0.1:%d/pair", httpPort)
		for _, c := range []struct {
			what, token string
			want        int
		}{
			{"no token", "", http.StatusUnauthorized},
			{"a wrong token", "wrong-" + healthToken[:8], http.StatusUnauthorized},
			{"the Bearer token", healthToken, http.StatusOK},
		} {
			req, err := http.NewRequest(http.MethodGet, pairURL, nil)
			if err != nil {
				t.Fatal(err)
			}
			if c.token != "" {
				req.Header.Set("Authorization", "Bearer "+c.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("GET /pair with %s: %v", c.what, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Errorf("GET /pair with %s = %d, want %d", c.what, resp.StatusCode, c.want)
			}
			for _, sec := range secrets {
				if bytes.Contains(body, []byte(sec)) {
					t.Errorf("GET /pair with %s shows a secret", c.what)
				}
			}
		}
	})

	var manual bus.BackupReply
	t.Run("a backup requested over NATS lands in PostgreSQL", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		asked := time.Now()
		if err := bus.Request(ctx, nc, subj.BackupRequest(), bus.BackupRequest{Reason: bus.ReasonManual}, &manual); err != nil {
			t.Fatalf("backup request: %v", err)
		}
		if !manual.OK || manual.Snapshot == nil || manual.Snapshot.ID == 0 {
			t.Fatalf("backup reply = %+v, want ok with a snapshot", manual)
		}
		if manual.Stored != bus.StoredDatabase {
			t.Errorf("backup reply stored %q, want %q", manual.Stored, bus.StoredDatabase)
		}
		// Compose replicates continuously (SYNC_INTERVAL 1s): the reply
		// names the point that covers the request.
		row, ok := findRow(snapshots(t, db.URL, session), manual.Snapshot.ID, syncOn)
		if !ok {
			t.Fatalf("the reply's snapshot %d (a point: %v) is not in the database: %+v", manual.Snapshot.ID, syncOn, snapshots(t, db.URL, session))
		}
		if row.SHA256 != manual.Snapshot.SHA256 || row.Size != manual.Snapshot.Bytes {
			t.Errorf("row %+v does not match the reply %+v", row, *manual.Snapshot)
		}
		// A full snapshot is the request's. The point that covers it may be
		// one continuous replication took for a change (reason sync), but
		// then one that read the store after the request came, unless the
		// store has not changed since an older one.
		if !manual.Snapshot.Unchanged && !syncOn && row.Reason != bus.ReasonManual {
			t.Errorf("snapshot %d reason = %q, want manual", row.ID, row.Reason)
		}
		if !manual.Snapshot.Unchanged && syncOn && row.At.Before(asked) {
			t.Errorf("point %s was taken at %s, before the request (%s), and the store had changed since", row.CLIID(), row.At, asked)
		}
	})

	t.Run("the CLI commands the deploy guides use work against the processes", func(t *testing.T) {
		// docker compose exec backup blacksky backup-now
		out := run(t, bin, base, "backup-now", "--reason", "restore-point", "--timeout", "30s")
		var rep bus.BackupReply
		if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &rep); err != nil || !rep.OK || rep.Snapshot == nil {
			t.Errorf("backup-now printed %q (%v), want an ok reply with a snapshot", out, err)
		}
		// The image's HEALTHCHECK.
		if out := run(t, bin, local("health", dataDir, httpPort), "healthcheck"); strings.TrimSpace(out) != "ok" {
			t.Errorf("healthcheck printed %q, want ok", out)
		}
		// WhatsApp is unreachable here: not ready, with reasons.
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", httpPort))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !bytes.Contains(body, []byte("whatsapp")) && !bytes.Contains(body, []byte("WhatsApp")) {
			t.Errorf("/readyz = %d %s, want 503 naming WhatsApp", resp.StatusCode, body)
		}
		// Neither /status (even with the token) nor /metrics shows a secret.
		for _, path := range []string{"/status", "/metrics", "/readyz"} {
			req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", httpPort, path), nil)
			req.Header.Set("Authorization", "Bearer "+healthToken)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, sec := range secrets {
				if bytes.Contains(body, []byte(sec)) {
					t.Errorf("%s shows a secret", path)
				}
			}
		}
	})

	// WhatsApp traffic changes the store between snapshots; without a change
	// the shutdown snapshot would be "unchanged" and not stored again.
	touchStore(t, sessionPath)

	var shutdown snapshotRow
	// Compose's stop order (the reverse of depends_on): health, then the
	// gateway (socket closed), then backup (shutdown snapshot, lease released).
	t.Run("SIGTERM health, then gateway, then backup ends with a shutdown snapshot", func(t *testing.T) {
		for _, p := range []*proc{health, gateway, backup} {
			took := p.stop(t, 25*time.Second)
			t.Logf("%s stopped %s after SIGTERM", p.name, took.Round(time.Millisecond))
		}
		shutdown = checkShutdownRow(t, snapshots(t, db.URL, session), backup, sessionPath)
		if manual.Snapshot != nil && shutdown.SHA256 == manual.Snapshot.SHA256 {
			t.Error("the shutdown snapshot has the manual one's sha256, though the store changed in between")
		}
		checkLogs(t, secrets, gateway, backup, health)
	})
	if shutdown.ID == 0 {
		t.FailNow()
	}

	t.Run("a fresh data folder comes back restored", func(t *testing.T) {
		fresh := t.TempDir()
		freshPath := filepath.Join(fresh, "session.db")
		backup2 := start(t, bin, "backup (fresh disk)", local("backup", fresh, httpPort), svcs["backup"].args...)
		gateway2 := start(t, bin, "gateway (fresh disk)", local("gateway", fresh, httpPort), svcs["gateway"].args...)
		nc2, err := bus.Connect(natsURL, natsToken, "e2e-2", slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		defer nc2.Close()
		restores := watchRestores(t, nc2)
		beats := watchHeartbeats(t, nc2, subj)

		var sha string
		waitFor(t, 30*time.Second, "the restored session.db", func() bool {
			if !gateway2.running() || !backup2.running() {
				t.Fatalf("a process exited: gateway %v, backup %v", gateway2.err, backup2.err)
			}
			if _, err := os.Stat(freshPath); err != nil {
				return false
			}
			// Read at once: the gateway opens the store right after.
			sha = storeHash(t, freshPath, shutdown)
			return true
		})
		if sha != shutdown.SHA256 {
			t.Errorf("restored session.db hash %s, want the shutdown backup's %s", sha, shutdown.SHA256)
		}
		if got, want := deviceJID(t, freshPath), wastore.DeviceJID.String(); got != want {
			t.Errorf("restored device %s, want %s", got, want)
		}
		waitFor(t, 20*time.Second, "the gateway to move past the restore", func() bool {
			hb, ok := beats.get("gateway")
			return ok && hb.State != bus.StateStarting && hb.State != bus.StateWaitingRestore && hb.State != bus.StateStandby
		})
		for _, rr := range restores.list() {
			t.Logf("restore reply: %+v", rr)
		}
		gateway2.stop(t, 25*time.Second)
		backup2.stop(t, 25*time.Second)
		checkLogs(t, secrets, gateway2, backup2)
	})

	t.Run("blacksky restore: the newest into an empty folder, an older one only with --force", func(t *testing.T) {
		rows := snapshots(t, db.URL, session)
		newest := rows[len(rows)-1]
		out := run(t, bin, base, "snapshots")
		if !regexp.MustCompile(`(?m)^\s*` + newest.CLIID() + `\s`).MatchString(out) {
			t.Errorf("blacksky snapshots does not list %s:\n%s", newest.CLIID(), out)
		}
		third := t.TempDir()
		run(t, bin, base.with("DATA_DIR", third), "restore")
		if sha := storeHash(t, filepath.Join(third, "session.db"), newest); sha != newest.SHA256 {
			t.Errorf("restored sha256 %s, want the newest snapshot's %s", sha, newest.SHA256)
		}

		// Going back to an older snapshot (docs/docker.md): refused over an
		// existing store without --force, written with it.
		older := rows[0]
		if older.ID == newest.ID {
			t.Fatalf("want at least two snapshots, have %+v", rows)
		}
		id := older.CLIID()
		if _, stderr, code := runCode(t, bin, base.with("DATA_DIR", third), "restore", "--id", id); code == 0 {
			t.Errorf("restore over an existing session.db without --force succeeded: %s", stderr)
		}
		if sha := storeHash(t, filepath.Join(third, "session.db"), newest); sha != newest.SHA256 {
			t.Error("a refused restore changed session.db")
		}
		run(t, bin, base.with("DATA_DIR", third), "restore", "--id", id, "--force")
		if sha := storeHash(t, filepath.Join(third, "session.db"), older); sha != older.SHA256 {
			t.Errorf("restore --id %s --force gave sha256 %s, want %s", id, sha, older.SHA256)
		}
	})
	t.Logf("end to end in %s", time.Since(began).Round(time.Millisecond))
}
