package deploy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/dotenv"
	"github.com/compose-spec/compose-go/v2/graph"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v4"

	"github.com/blacksky-md/blacksky/shared/config"
)

// root is the repository root: the tests run in deploy/.
const root = ".."

func readFile(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, rel))
	if err != nil {
		t.Fatalf("read %s: %v", rel, err)
	}
	return b
}

func mustVar(t *testing.T, name string) config.Var {
	t.Helper()
	v, ok := config.Lookup(name)
	if !ok {
		t.Fatalf("%s is not in config.Vars", name)
	}
	return v
}

// genSecret is what Heroku's "secret" generator makes: 64 hex characters.
func genSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// envFunc turns a map into config.Getenv.
func envFunc(m map[string]string) config.Getenv {
	return func(k string) string { return m[k] }
}

func TestGeneratedFilesUpToDate(t *testing.T) {
	for _, g := range Generated {
		t.Run(g.Path, func(t *testing.T) {
			want, err := g.Render()
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			if got := readFile(t, g.Path); !bytes.Equal(got, want) {
				t.Errorf("%s differs from what shared/config.Vars gives: run `go run ./deploy/gen`", g.Path)
			}
		})
	}
}

// envExampleLines reads .env.example: live NAME=value lines through
// compose's own dotenv parser, and the commented "#NAME=value" defaults.
func envExampleLines(t *testing.T) (live, commented map[string]string) {
	t.Helper()
	raw := readFile(t, ".env.example")
	live, err := dotenv.ParseWithLookup(bytes.NewReader(raw), func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatalf("docker compose cannot parse .env.example: %v", err)
	}
	commented = map[string]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		rest, ok := strings.CutPrefix(line, "#")
		if !ok {
			continue
		}
		name, value, ok := strings.Cut(rest, "=")
		if !ok || name == "" || strings.ContainsAny(name, " \t") || strings.ToUpper(name) != name {
			continue
		}
		if _, dup := commented[name]; dup {
			t.Errorf(".env.example: %s appears twice", name)
		}
		commented[name] = value
	}
	return live, commented
}

func TestEnvExampleListsEveryVariable(t *testing.T) {
	live, commented := envExampleLines(t)
	for name := range live {
		if _, ok := commented[name]; ok {
			t.Errorf(".env.example: %s is both set and commented out", name)
		}
	}
	seen := map[string]bool{}
	for name := range live {
		seen[name] = true
	}
	for name := range commented {
		seen[name] = true
	}
	for name := range seen {
		if _, ok := lookupVar(name); !ok {
			t.Errorf(".env.example: %s is not a variable BLACKSKY-MD or its compose file reads", name)
		}
	}
	for _, v := range config.Vars {
		if !seen[v.Name] {
			t.Errorf(".env.example: %s is missing", v.Name)
		}
	}
	// The live lines are exactly the secrets compose requires, left empty:
	// a real secret must never be committed.
	var liveNames []string
	for name, value := range live {
		liveNames = append(liveNames, name)
		if value != "" {
			t.Errorf(".env.example: %s has a value; secrets must be empty in the example", name)
		}
	}
	slices.Sort(liveNames)
	wantLive := slices.Sorted(slices.Values(ComposeRequired))
	if !slices.Equal(liveNames, wantLive) {
		t.Errorf(".env.example live lines = %v, want the compose-required secrets %v", liveNames, wantLive)
	}
	for name, value := range commented {
		v, ok := config.Lookup(name)
		if !ok {
			continue
		}
		want := v.Default
		if _, fixed := composeFixedValue(name); !fixed {
			want = composeDefault(v)
		}
		if value != want {
			t.Errorf(".env.example: #%s=%s, want the default %q", name, value, want)
		}
	}
}

// loadCompose loads docker-compose.yml the way `docker compose` does, with
// env as the variables of .env.
func loadCompose(t *testing.T, env map[string]string) (*types.Project, error) {
	t.Helper()
	var list []string
	for k, v := range env {
		list = append(list, k+"="+v)
	}
	opts, err := cli.NewProjectOptions(
		[]string{filepath.Join(root, "docker-compose.yml")},
		cli.WithWorkingDirectory(root),
		cli.WithEnv(list),
	)
	if err != nil {
		t.Fatalf("compose options: %v", err)
	}
	return opts.LoadProject(context.Background())
}

// secretsEnv is a filled-in .env: the three required secrets.
func secretsEnv(t *testing.T) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, name := range ComposeRequired {
		env[name] = genSecret(t)
	}
	return env
}

func mustLoadCompose(t *testing.T, env map[string]string) *types.Project {
	t.Helper()
	p, err := loadCompose(t, env)
	if err != nil {
		t.Fatalf("docker compose would refuse docker-compose.yml: %v", err)
	}
	return p
}

// serviceEnv is a service's resolved environment.
func serviceEnv(t *testing.T, s types.ServiceConfig) map[string]string {
	t.Helper()
	out := map[string]string{}
	for k, v := range s.Environment {
		if v == nil {
			t.Errorf("service %s: %s has no value (it would come from the host environment)", s.Name, k)
			continue
		}
		out[k] = *v
	}
	return out
}

var blackskyServices = []string{"gateway", "backup", "relay", "health"}

func TestComposeTopology(t *testing.T) {
	p := mustLoadCompose(t, secretsEnv(t))

	names := p.ServiceNames()
	if want := []string{"backup", "gateway", "health", "postgres", "relay"}; !slices.Equal(names, want) {
		t.Fatalf("services = %v, want %v", names, want)
	}

	tests := []struct {
		service   string
		command   []string
		dependsOn map[string]string // service -> condition
		volumes   map[string]string // named volume -> target
	}{
		{"postgres", nil, nil, map[string]string{"pgdata": "/var/lib/postgresql/data"}},
		{"backup", []string{"blacksky", "backup"}, map[string]string{"postgres": types.ServiceConditionHealthy}, map[string]string{"data": "/data"}},
		{"relay", []string{"blacksky", "relay"}, map[string]string{"postgres": types.ServiceConditionHealthy}, map[string]string{}},
		{"gateway", []string{"blacksky", "gateway"}, map[string]string{"postgres": types.ServiceConditionHealthy, "backup": types.ServiceConditionStarted,
			"relay": types.ServiceConditionStarted}, map[string]string{"data": "/data"}},
		{"health", []string{"blacksky", "health"}, map[string]string{"gateway": types.ServiceConditionStarted}, map[string]string{}},
	}
	for _, tt := range tests {
		t.Run(tt.service, func(t *testing.T) {
			s := p.Services[tt.service]
			if tt.command != nil && !slices.Equal([]string(s.Command), tt.command) {
				t.Errorf("command = %q, want %q", s.Command, tt.command)
			}
			deps := map[string]string{}
			for name, d := range s.DependsOn {
				deps[name] = d.Condition
			}
			if tt.dependsOn == nil {
				tt.dependsOn = map[string]string{}
			}
			if fmt.Sprint(deps) != fmt.Sprint(tt.dependsOn) {
				t.Errorf("depends_on = %v, want %v", deps, tt.dependsOn)
			}
			vols := map[string]string{}
			for _, v := range s.Volumes {
				if v.Type != types.VolumeTypeVolume {
					t.Errorf("volume %s:%s is a %s, want a named volume", v.Source, v.Target, v.Type)
				}
				vols[v.Source] = v.Target
				if _, ok := p.Volumes[v.Source]; !ok {
					t.Errorf("volume %s is not declared at the top level", v.Source)
				}
			}
			if fmt.Sprint(vols) != fmt.Sprint(tt.volumes) {
				t.Errorf("volumes = %v, want %v", vols, tt.volumes)
			}
			if s.Restart != types.RestartPolicyUnlessStopped {
				t.Errorf("restart = %q, want %q", s.Restart, types.RestartPolicyUnlessStopped)
			}
		})
	}

	// The three roles run the same image, built from this repository's
	// Dockerfile.
	for _, name := range blackskyServices {
		s := p.Services[name]
		if s.Image != p.Services["gateway"].Image || s.Image == "" {
			t.Errorf("%s image = %q, want the gateway's %q", name, s.Image, p.Services["gateway"].Image)
		}
		if s.Build == nil || filepath.Clean(s.Build.Context) != mustAbs(t, root) {
			t.Errorf("%s must build the repository's Dockerfile, got %+v", name, s.Build)
		}
	}
}

func mustAbs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Clean(a)
}

func TestComposeHealthchecks(t *testing.T) {
	p := mustLoadCompose(t, secretsEnv(t))
	pg := p.Services["postgres"].HealthCheck
	if pg == nil || pg.Disable || !slices.Contains([]string(pg.Test), "pg_isready") {
		t.Errorf("postgres healthcheck = %+v, want pg_isready", pg)
	}
	h := p.Services["health"].HealthCheck
	if h == nil || h.Disable || !slices.Equal([]string(h.Test), []string{"CMD", "blacksky", "healthcheck"}) {
		t.Errorf("health healthcheck = %+v, want [CMD blacksky healthcheck]", h)
	}
	// gateway and backup serve no HTTP: the image's HEALTHCHECK (which asks
	// /healthz on $PORT) would mark them unhealthy for ever.
	for _, name := range []string{"gateway", "backup", "relay"} {
		if hc := p.Services[name].HealthCheck; hc == nil || !hc.Disable {
			t.Errorf("%s healthcheck = %+v, want disabled", name, hc)
		}
	}
}

func TestComposeStopOrder(t *testing.T) {
	p := mustLoadCompose(t, secretsEnv(t))
	// docker compose stops services in reverse dependency order; walk the
	// graph the way compose-go's graph package (which compose uses) does.
	var mu sync.Mutex
	var order []string
	err := graph.InDependencyOrder(context.Background(), p, func(_ context.Context, name string, _ types.ServiceConfig) error {
		mu.Lock()
		defer mu.Unlock()
		order = append(order, name)
		return nil
	}, graph.InReverseOrder, graph.WithMaxConcurrency(1))
	if err != nil {
		t.Fatalf("stop order: %v", err)
	}
	// backup and relay both outlive the gateway; between the two the order
	// is free (neither depends on the other), and compose picks either.
	want := []string{"health", "gateway", "backup", "relay", "postgres"}
	if len(order) == len(want) && order[2] == "relay" && order[3] == "backup" {
		order[2], order[3] = order[3], order[2]
	}
	if !slices.Equal(order, want) {
		t.Errorf("stop order = %v, want %v: the gateway must close its socket before backup takes the shutdown snapshot, "+
			"and stop acknowledging messages before relay, which stores them, stops", order, want)
	}

	// Each blacksky service gets longer than SHUTDOWN_TIMEOUT before SIGKILL.
	for _, name := range blackskyServices {
		s := p.Services[name]
		env := serviceEnv(t, s)
		shutdown, err := time.ParseDuration(env["SHUTDOWN_TIMEOUT"])
		if err != nil {
			t.Fatalf("%s SHUTDOWN_TIMEOUT: %v", name, err)
		}
		if s.StopGracePeriod == nil || time.Duration(*s.StopGracePeriod) < shutdown+3*time.Second {
			t.Errorf("%s stop_grace_period = %v, want at least SHUTDOWN_TIMEOUT (%s) + 3s", name, s.StopGracePeriod, shutdown)
		}
	}
}

func TestComposeEnvironment(t *testing.T) {
	secrets := secretsEnv(t)
	p := mustLoadCompose(t, secrets)
	for _, name := range blackskyServices {
		t.Run(name, func(t *testing.T) {
			env := serviceEnv(t, p.Services[name])
			fixed := ComposeFixed[name]
			for k := range env {
				if _, ok := config.Lookup(k); !ok {
					t.Errorf("%s is not a variable BLACKSKY-MD reads (shared/config.Vars)", k)
				}
			}
			for _, v := range config.Vars {
				got, ok := env[v.Name]
				_, fixedHere := fixed[v.Name]
				_, fixedElsewhere := composeFixedValue(v.Name)
				switch {
				case fixedHere:
					if got != fixed[v.Name] {
						t.Errorf("%s = %q, want %q", v.Name, got, fixed[v.Name])
					}
				case fixedElsewhere:
					// NATS_LISTEN on backup, NATS_URL on the gateway: absent,
					// so the role's own default applies.
					if ok {
						t.Errorf("%s = %q is set, but only another role may set it", v.Name, got)
					}
				case isComposeRequired(v.Name):
					if got != secrets[v.Name] {
						t.Errorf("%s does not come from .env", v.Name)
					}
				case !ok:
					t.Errorf("%s is missing: .env could not set it", v.Name)
				case got != os.Expand(composeDefault(v), func(k string) string { return secrets[k] }):
					t.Errorf("%s defaults to %q, want %q", v.Name, got, composeDefault(v))
				}
			}
			// The environment is a valid configuration for the binary.
			cfg, err := config.Load(envFunc(env))
			if err != nil {
				t.Fatalf("blacksky %s would exit 2: %v", name, err)
			}
			if !cfg.Production {
				t.Errorf("compose should run in production mode")
			}
			if err := cfg.RequireDatabase(); err != nil {
				t.Errorf("RequireDatabase: %v", err)
			}
		})
	}

	// The NATS wiring: backup and health reach the gateway's listener.
	gw := serviceEnv(t, p.Services["gateway"])
	_, listenPort, err := net.SplitHostPort(gw["NATS_LISTEN"])
	if err != nil {
		t.Fatalf("gateway NATS_LISTEN: %v", err)
	}
	if err := config.ValidateListen(gw["NATS_LISTEN"], gw["NATS_TOKEN"]); err != nil {
		t.Errorf("gateway NATS_LISTEN: %v", err)
	}
	for _, name := range []string{"backup", "relay", "health"} {
		env := serviceEnv(t, p.Services[name])
		u, err := url.Parse(env["NATS_URL"])
		if err != nil {
			t.Fatalf("%s NATS_URL: %v", name, err)
		}
		if u.Scheme != "nats" || u.Hostname() != "gateway" || u.Port() != listenPort {
			t.Errorf("%s NATS_URL = %s, want nats://gateway:%s", name, env["NATS_URL"], listenPort)
		}
		if env["NATS_TOKEN"] != gw["NATS_TOKEN"] {
			t.Errorf("%s NATS_TOKEN differs from the gateway's", name)
		}
	}

	// DATABASE_URL points at the postgres service with its credentials.
	pg := serviceEnv(t, p.Services["postgres"])
	for _, name := range []string{"gateway", "backup", "relay"} {
		u, err := url.Parse(serviceEnv(t, p.Services[name])["DATABASE_URL"])
		if err != nil {
			t.Fatal(err)
		}
		pw, _ := u.User.Password()
		if u.Hostname() != "postgres" || u.User.Username() != pg["POSTGRES_USER"] || pw != pg["POSTGRES_PASSWORD"] || strings.TrimPrefix(u.Path, "/") != pg["POSTGRES_DB"] {
			t.Errorf("%s DATABASE_URL does not match the postgres service", name)
		}
	}

	// health publishes $PORT, the port it listens on.
	h := p.Services["health"]
	port := serviceEnv(t, h)["PORT"]
	if len(h.Ports) != 1 || fmt.Sprint(h.Ports[0].Target) != port || h.Ports[0].Published != port {
		t.Errorf("health ports = %+v, want %s:%s", h.Ports, port, port)
	}
	for _, name := range []string{"postgres", "gateway", "backup", "relay"} {
		if len(p.Services[name].Ports) != 0 {
			t.Errorf("%s publishes ports %+v; only health should", name, p.Services[name].Ports)
		}
	}
}

func TestComposeEnvFileOverrides(t *testing.T) {
	env := secretsEnv(t)
	env["PREFIX"] = "!"
	env["PORT"] = "9090"
	env["DATA_DIR"] = "/elsewhere"                 // pinned: the volume is at /data
	env["NATS_LISTEN"] = "127.0.0.1:1"             // pinned on the gateway
	env["DATABASE_URL"] = "postgres://x@db:5432/y" // an outside database
	p := mustLoadCompose(t, env)
	for _, name := range blackskyServices {
		got := serviceEnv(t, p.Services[name])
		if got["PREFIX"] != "!" || got["PORT"] != "9090" {
			t.Errorf("%s: PREFIX=%q PORT=%q, want .env's ! and 9090", name, got["PREFIX"], got["PORT"])
		}
		if got["DATA_DIR"] != "/data" {
			t.Errorf("%s: DATA_DIR = %q, want /data whatever .env says", name, got["DATA_DIR"])
		}
		if got["DATABASE_URL"] != env["DATABASE_URL"] {
			t.Errorf("%s: DATABASE_URL not taken from .env", name)
		}
	}
	if got := serviceEnv(t, p.Services["gateway"])["NATS_LISTEN"]; got != "0.0.0.0:4222" {
		t.Errorf("gateway NATS_LISTEN = %q, want 0.0.0.0:4222 whatever .env says", got)
	}
	if h := p.Services["health"]; len(h.Ports) != 1 || h.Ports[0].Target != 9090 || h.Ports[0].Published != "9090" {
		t.Errorf("health ports = %+v, want 9090:9090", h.Ports)
	}
}

func TestComposeRequiresSecrets(t *testing.T) {
	for _, missing := range ComposeRequired {
		t.Run(missing, func(t *testing.T) {
			env := secretsEnv(t)
			delete(env, missing)
			_, err := loadCompose(t, env)
			if err == nil {
				t.Fatalf("docker compose starts without %s", missing)
			}
			if !strings.Contains(err.Error(), missing) {
				t.Errorf("error %q does not name %s", err, missing)
			}
		})
	}
}

// herokuManifest is the part of heroku.yml the tests read.
type herokuManifest struct {
	Setup struct {
		Addons []struct {
			Plan string `yaml:"plan"`
			As   string `yaml:"as"`
		} `yaml:"addons"`
		Config map[string]string `yaml:"config"`
	} `yaml:"setup"`
	Build struct {
		Docker map[string]string `yaml:"docker"`
	} `yaml:"build"`
	Release struct {
		Image   string   `yaml:"image"`
		Command []string `yaml:"command"`
	} `yaml:"release"`
	Run map[string]yaml.Node `yaml:"run"`
}

// commands are the binary's subcommands (CONTRACT section 1).
var commands = []string{"run", "gateway", "backup", "health", "migrate", "backup-now", "snapshots", "restore", "healthcheck", "version"}

// runCommand reads a heroku.yml run entry: a string, or {command: [...]}.
func runCommand(t *testing.T, n yaml.Node) string {
	t.Helper()
	var s string
	if err := n.Decode(&s); err == nil {
		return s
	}
	var long struct {
		Command []string `yaml:"command"`
		Image   string   `yaml:"image"`
	}
	if err := n.Decode(&long); err != nil || len(long.Command) != 1 {
		t.Fatalf("run entry at line %d: want a command string or {command: [one]}", n.Line)
	}
	return long.Command[0]
}

func checkBlackskyCommand(t *testing.T, where, cmd, want string) {
	t.Helper()
	f := strings.Fields(cmd)
	if len(f) != 2 || f[0] != "blacksky" || !slices.Contains(commands, f[1]) {
		t.Errorf("%s: %q is not a blacksky command", where, cmd)
	}
	if cmd != want {
		t.Errorf("%s = %q, want %q", where, cmd, want)
	}
}

func TestHerokuYML(t *testing.T) {
	raw := readFile(t, "heroku.yml")
	var m herokuManifest
	if err := yaml.Unmarshal(raw, &m); err != nil {
		t.Fatalf("heroku.yml: %v", err)
	}
	if m.Build.Docker["web"] != "Dockerfile" {
		t.Errorf("build.docker.web = %q, want Dockerfile", m.Build.Docker["web"])
	}
	if _, err := os.Stat(filepath.Join(root, m.Build.Docker["web"])); err != nil {
		t.Errorf("build.docker.web: %v", err)
	}
	if m.Release.Image != "web" || len(m.Release.Command) != 1 {
		t.Errorf("release = %+v, want image web and one command", m.Release)
	} else {
		checkBlackskyCommand(t, "release.command", m.Release.Command[0], "blacksky migrate")
	}
	// One web dyno holds everything: embedded NATS cannot span dynos.
	if len(m.Run) != 1 {
		t.Errorf("run has %d process types, want only web", len(m.Run))
	}
	web, ok := m.Run["web"]
	if !ok {
		t.Fatal("run.web is missing")
	}
	checkBlackskyCommand(t, "run.web", runCommand(t, web), "blacksky run")

	if len(m.Setup.Addons) != 1 || m.Setup.Addons[0].Plan != "heroku-postgresql" {
		t.Errorf("setup.addons = %+v, want heroku-postgresql", m.Setup.Addons)
	}
	for k, v := range m.Setup.Config {
		mustVar(t, k)
		if want, ok := HerokuValues[k]; !ok || v != want {
			t.Errorf("setup.config %s = %q, want app.json's %q", k, v, want)
		}
	}
	if m.Setup.Config["NODE_ENV"] != "production" || m.Setup.Config["HEROKU"] != "true" {
		t.Errorf("setup.config = %v, want NODE_ENV=production and HEROKU=true", m.Setup.Config)
	}
}

// roleSets says which long-running roles each blacksky command holds.
var roleSets = map[string][]string{
	"blacksky run":     {"gateway", "backup", "health"},
	"blacksky gateway": {"gateway"},
	"blacksky backup":  {"backup"},
	"blacksky health":  {"health"},
}

// checkSameDyno: backup snapshots the gateway's $DATA_DIR/session.db and
// restores into it, and dynos share no disk, so the process type that runs
// the gateway must run backup too, in the same process; and only one
// process type may run the gateway (one session, one socket).
func checkSameDyno(t *testing.T, where string, run map[string]yaml.Node) {
	t.Helper()
	holders := map[string][]string{} // role -> process types
	for proc, n := range run {
		cmd := runCommand(t, n)
		for _, role := range roleSets[cmd] {
			holders[role] = append(holders[role], proc)
		}
	}
	gw, bk := holders["gateway"], holders["backup"]
	if len(gw) != 1 {
		t.Errorf("%s: the gateway runs in process types %v, want exactly one", where, gw)
		return
	}
	if len(bk) != 1 || bk[0] != gw[0] {
		t.Errorf("%s: backup runs in %v and the gateway in %v: dynos share no disk, so backup would snapshot and restore a session.db the gateway never uses; run both in one process (blacksky run)", where, bk, gw)
	}
}

// commentedRunBlocks finds every commented-out `# run:` block of heroku.yml
// and parses it as it would read once uncommented.
func commentedRunBlocks(t *testing.T, raw string) []map[string]yaml.Node {
	t.Helper()
	var out []map[string]yaml.Node
	lines := strings.Split(raw, "\n")
	for i, line := range lines {
		if line != "# run:" {
			continue
		}
		var block []string
		for _, l := range lines[i:] {
			if !strings.HasPrefix(l, "# ") {
				break // a bare "#" or code ends the block
			}
			block = append(block, strings.TrimPrefix(l, "# "))
		}
		var alt struct {
			Run map[string]yaml.Node `yaml:"run"`
		}
		if err := yaml.Unmarshal([]byte(strings.Join(block, "\n")), &alt); err != nil {
			t.Fatalf("heroku.yml line %d: the commented alternative is not valid YAML: %v", i+1, err)
		}
		out = append(out, alt.Run)
	}
	return out
}

// TestHerokuYMLAlternative reads the commented-out alternative: once
// uncommented it must be valid heroku.yml whose commands are blacksky's,
// with gateway and backup in one process on one dyno, and the external
// NATS_URL it is about must be explained.
func TestHerokuYMLAlternative(t *testing.T) {
	raw := string(readFile(t, "heroku.yml"))
	var m herokuManifest
	if err := yaml.Unmarshal([]byte(raw), &m); err != nil {
		t.Fatalf("heroku.yml: %v", err)
	}
	checkSameDyno(t, "heroku.yml run", m.Run)

	alts := commentedRunBlocks(t, raw)
	if len(alts) == 0 {
		t.Fatal("heroku.yml: the commented alternative `# run:` block is missing")
	}
	for i, alt := range alts {
		where := fmt.Sprintf("heroku.yml commented alternative %d", i+1)
		for proc, n := range alt {
			cmd := runCommand(t, n)
			if _, ok := roleSets[cmd]; !ok {
				t.Errorf("%s: run.%s = %q, want one of %v", where, proc, cmd, slices.Sorted(maps.Keys(roleSets)))
			}
		}
		checkSameDyno(t, where, alt)
	}
	if !strings.Contains(raw, "NATS_URL") {
		t.Error("the alternative must say it needs an external NATS_URL")
	}

	// The guide must not tell anyone to scale gateway or backup process
	// types of their own either.
	guide := string(readFile(t, "docs/heroku.md"))
	if loc := splitScale.FindStringIndex(guide); loc != nil {
		t.Errorf("docs/heroku.md scales a separate gateway or backup dyno (%q): they must share one process", guide[loc[0]:loc[1]])
	}
}

var splitScale = regexp.MustCompile(`\b(gateway|backup)=\d`)

// appJSON is app.json as Heroku reads it.
type appJSON struct {
	Name        string   `json:"name"`
	Description string   `json:"description"`
	Repository  string   `json:"repository"`
	Stack       string   `json:"stack"`
	SuccessURL  string   `json:"success_url"`
	Keywords    []string `json:"keywords"`
	Formation   map[string]struct {
		Quantity int    `json:"quantity"`
		Size     string `json:"size"`
	} `json:"formation"`
	Addons []json.RawMessage `json:"addons"`
	Env    map[string]struct {
		Description string  `json:"description"`
		Value       *string `json:"value"`
		Required    *bool   `json:"required"`
		Generator   string  `json:"generator"`
	} `json:"env"`
}

func loadAppJSON(t *testing.T) appJSON {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(readFile(t, "app.json")))
	dec.DisallowUnknownFields()
	var a appJSON
	if err := dec.Decode(&a); err != nil {
		t.Fatalf("app.json: %v", err)
	}
	return a
}

func TestAppJSON(t *testing.T) {
	a := loadAppJSON(t)
	if a.Stack != "container" {
		t.Errorf("stack = %q, want container (heroku.yml builds the Dockerfile)", a.Stack)
	}
	if a.SuccessURL != "/pair" {
		t.Errorf("success_url = %q, want /pair", a.SuccessURL)
	}
	// Heroku's limits on the button's manifest.
	if n := len(a.Name); n < 3 || n > 30 {
		t.Errorf("name %q: Heroku wants 3 to 30 characters", a.Name)
	}
	if len(a.Description) > 140 {
		t.Errorf("description has %d characters; Heroku allows 140", len(a.Description))
	}
	if u, err := url.Parse(a.Repository); err != nil || u.Scheme != "https" || u.Host != "github.com" {
		t.Errorf("repository = %q, want the GitHub URL", a.Repository)
	}
	if len(a.Formation) != 1 || a.Formation["web"].Quantity != 1 || !slices.Contains([]string{"eco", "basic"}, a.Formation["web"].Size) {
		t.Errorf("formation = %+v, want one web dyno (eco or basic)", a.Formation)
	}
	hasPG := false
	for _, raw := range a.Addons {
		var plan string
		var obj struct {
			Plan string `json:"plan"`
		}
		if json.Unmarshal(raw, &plan) != nil && json.Unmarshal(raw, &obj) == nil {
			plan = obj.Plan
		}
		if plan == "heroku-postgresql" || strings.HasPrefix(plan, "heroku-postgresql:") {
			hasPG = true
		}
	}
	if !hasPG {
		t.Errorf("addons = %s, want heroku-postgresql", a.Addons)
	}

	for name := range a.Env {
		if _, ok := config.Lookup(name); !ok {
			t.Errorf("env %s is not a variable BLACKSKY-MD reads", name)
		}
	}
	for _, v := range config.Vars {
		e, ok := a.Env[v.Name]
		if _, omit := HerokuOmitted[v.Name]; omit {
			if ok {
				t.Errorf("env %s must not be in app.json: %s", v.Name, HerokuOmitted[v.Name])
			}
			continue
		}
		if !ok {
			t.Errorf("env %s is missing", v.Name)
			continue
		}
		if e.Description == "" {
			t.Errorf("env %s has no description", v.Name)
		}
		if e.Required == nil {
			t.Errorf("env %s: say required true or false (Heroku's default is true)", v.Name)
			continue
		}
		switch {
		case e.Generator != "":
			if e.Generator != "secret" || e.Value != nil {
				t.Errorf("env %s: generator %q with value %v, want secret alone", v.Name, e.Generator, e.Value)
			}
		case e.Value == nil:
			t.Errorf("env %s has no default value", v.Name)
		case *e.Required && *e.Value == "":
			t.Errorf("env %s is required with an empty default: the button would block on it", v.Name)
		}
	}
	for _, name := range []string{"SESSION_ENCRYPTION_KEY", "HEALTH_TOKEN", "NATS_TOKEN"} {
		if a.Env[name].Generator != "secret" {
			t.Errorf("env %s: want generator secret", name)
		}
		if !mustVar(t, name).Secret {
			t.Errorf("%s is generated but not marked secret in config.Vars", name)
		}
	}
	for name, want := range HerokuValues {
		if e := a.Env[name]; e.Value == nil || *e.Value != want {
			t.Errorf("env %s = %v, want %q", name, e.Value, want)
		}
	}
}

// TestAppJSONBootsOnHeroku builds the environment a new Heroku app gets
// from the button (app.json values, generated secrets, the add-on's
// DATABASE_URL, Heroku's PORT and DYNO) and checks the binary accepts it.
func TestAppJSONBootsOnHeroku(t *testing.T) {
	a := loadAppJSON(t)
	env := map[string]string{
		"DATABASE_URL": "postgres://u1:p4ss@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d5",
		"PORT":         "31337",
		"DYNO":         "web.1",
	}
	for name, e := range a.Env {
		switch {
		case e.Generator == "secret":
			env[name] = genSecret(t)
		case e.Value != nil:
			env[name] = *e.Value
		}
	}
	cfg, err := config.Load(envFunc(env))
	if err != nil {
		t.Fatalf("a fresh Heroku app would exit 2: %v", err)
	}
	if err := cfg.RequireDatabase(); err != nil {
		t.Errorf("RequireDatabase: %v", err)
	}
	if !cfg.Production || !cfg.Heroku {
		t.Errorf("Production=%v Heroku=%v, want both", cfg.Production, cfg.Heroku)
	}
	if len(cfg.SessionEncryptionKey) != 32 {
		t.Errorf("the generated SESSION_ENCRYPTION_KEY gives a %d-byte key, want 32", len(cfg.SessionEncryptionKey))
	}
	if cfg.HealthToken == "" || cfg.NATSToken == "" {
		t.Error("HEALTH_TOKEN and NATS_TOKEN must be set by the generator")
	}
	// The web dyno embeds the bus, reachable only inside the dyno (heroku
	// ps:exec finds it through bus.json).
	if host, _, err := net.SplitHostPort(cfg.NATSListen); err != nil || !config.IsLoopback(host) || cfg.NATSURL != "" {
		t.Errorf("NATS_LISTEN=%q NATS_URL=%q: the web dyno's bus should be embedded, on loopback only", cfg.NATSListen, cfg.NATSURL)
	}
	if cfg.ShutdownTimeout >= 30*time.Second {
		t.Errorf("SHUTDOWN_TIMEOUT %s: Heroku kills at 30s", cfg.ShutdownTimeout)
	}
}

func TestHerokuSecretGeneratorMakesAKey(t *testing.T) {
	// Heroku's secret generator gives 64 hex characters; ParseKey must take
	// them as a 32-byte key, in either case.
	for _, s := range []string{genSecret(t), strings.ToUpper(genSecret(t))} {
		k, err := config.ParseKey(s)
		if err != nil || len(k) != 32 {
			t.Errorf("ParseKey(64 hex) = %d bytes, %v", len(k), err)
		}
	}
}

// mdTable reads the rows of the markdown table whose header names the
// columns: each row maps a column name to its cell.
func mdTable(t *testing.T, doc string, columns ...string) []map[string]string {
	t.Helper()
	lines := strings.Split(doc, "\n")
	for i, line := range lines {
		header := mdCells(line)
		if len(header) == 0 || !slices.Equal(header, columns) {
			continue
		}
		var rows []map[string]string
		for _, l := range lines[i+2:] {
			cells := mdCells(l)
			if len(cells) == 0 {
				break
			}
			if len(cells) != len(columns) {
				t.Errorf("table row %q has %d cells, want %d", l, len(cells), len(columns))
				continue
			}
			row := map[string]string{}
			for j, c := range columns {
				row[c] = cells[j]
			}
			rows = append(rows, row)
		}
		return rows
	}
	t.Fatalf("no table with columns %v", columns)
	return nil
}

func mdCells(line string) []string {
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "|") || !strings.HasSuffix(line, "|") {
		return nil
	}
	// Split on | not preceded by a backslash.
	var cells []string
	var cur strings.Builder
	body := line[1 : len(line)-1]
	for i := 0; i < len(body); i++ {
		switch {
		case body[i] == '\\' && i+1 < len(body) && body[i+1] == '|':
			cur.WriteByte('|')
			i++
		case body[i] == '|':
			cells = append(cells, strings.TrimSpace(cur.String()))
			cur.Reset()
		default:
			cur.WriteByte(body[i])
		}
	}
	return append(cells, strings.TrimSpace(cur.String()))
}

// checkEnvTable checks a variable table against config.Vars: every
// variable once, nothing unknown, defaults and descriptions as in the code.
func checkEnvTable(t *testing.T, doc, file string, columns ...string) {
	t.Helper()
	rows := mdTable(t, doc, columns...)
	seen := map[string]bool{}
	for _, r := range rows {
		name := strings.Trim(r["variable"], "`")
		v, ok := config.Lookup(name)
		if !ok {
			t.Errorf("%s: %s is not a variable BLACKSKY-MD reads", file, name)
			continue
		}
		if seen[name] {
			t.Errorf("%s: %s listed twice", file, name)
		}
		seen[name] = true
		wantDefault := "empty"
		if v.Default != "" {
			wantDefault = "`" + v.Default + "`"
		}
		if r["default"] != wantDefault {
			t.Errorf("%s: %s default %s, want %s", file, name, r["default"], wantDefault)
		}
		if r["meaning"] != v.Description {
			t.Errorf("%s: %s meaning %q, want config.Vars' %q", file, name, r["meaning"], v.Description)
		}
	}
	for _, v := range config.Vars {
		if !seen[v.Name] {
			t.Errorf("%s: %s is not documented", file, v.Name)
		}
	}
}

func TestDocsEnvTables(t *testing.T) {
	checkEnvTable(t, string(readFile(t, "docs/environment.md")), "docs/environment.md", "variable", "default", "secret", "meaning")
	checkEnvTable(t, string(readFile(t, "README.md")), "README.md", "variable", "default", "meaning")
}

func TestReadmeHasDeployButton(t *testing.T) {
	button := "https://heroku.com/deploy?template=" + Repository
	if !strings.Contains(string(readFile(t, "README.md")), button) {
		t.Errorf("README.md lacks the Deploy to Heroku button (%s)", button)
	}
}

// TestDocsMentionOnlyKnownVariables: every backticked UPPER_CASE name in
// the guides is a variable of config.Vars, or one of the few outside names
// the guides must mention.
func TestDocsMentionOnlyKnownVariables(t *testing.T) {
	outside := map[string]bool{
		"DYNO": true, "GOMEMLIMIT": true, "POSTGRES_USER": true, "POSTGRES_PASSWORD": true,
		"POSTGRES_DB": true, "TEST_DATABASE_URL": true, "CI": true, "HEALTHCHECK": true,
	}
	for _, file := range []string{"docs/heroku.md", "docs/docker.md", "docs/states.md", "README.md", "CONTRACT.md"} {
		doc := string(readFile(t, file))
		parts := strings.Split(doc, "`")
		for i := 1; i < len(parts); i += 2 { // the backticked spans
			name, _, _ := strings.Cut(parts[i], "=")
			if len(name) < 3 || strings.Trim(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789") != "" || strings.Trim(name, "0123456789_") == "" {
				continue
			}
			if _, ok := config.Lookup(name); !ok && !outside[name] {
				t.Errorf("%s mentions %s, which BLACKSKY-MD does not read", file, name)
			}
		}
	}
}

// TestComposeWithEnvExample: `cp .env.example .env` alone is refused with a
// message naming a secret; with the three secrets filled in, compose loads
// and every commented default is what the services get.
func TestComposeWithEnvExample(t *testing.T) {
	live, _ := envExampleLines(t)
	if _, err := loadCompose(t, live); err == nil {
		t.Fatal("docker compose starts with the unfilled .env.example")
	} else if !slices.ContainsFunc(ComposeRequired, func(n string) bool { return strings.Contains(err.Error(), n) }) {
		t.Errorf("error %q names none of %v", err, ComposeRequired)
	}
	filled := map[string]string{}
	for name := range live {
		filled[name] = genSecret(t)
	}
	p := mustLoadCompose(t, filled)
	_, commented := envExampleLines(t)
	for _, name := range blackskyServices {
		got := serviceEnv(t, p.Services[name])
		for k, v := range commented {
			if _, fixed := composeFixedValue(k); fixed {
				continue
			}
			if got[k] != os.Expand(v, func(k string) string { return filled[k] }) {
				t.Errorf("%s: %s = %q, but .env.example says the default is %q", name, k, got[k], v)
			}
		}
	}
}
