// Package deploy renders the environment parts of the deploy files
// (.env.example, app.json, docs/environment.md) from config.Vars, so they
// cannot drift from the code; its tests parse every deploy file and check it.
package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
)

// Generated lists the files `go run ./deploy/gen` writes, relative to the
// repository root, with the function that renders each.
var Generated = []struct {
	Path   string
	Render func() ([]byte, error)
}{
	{".env.example", EnvExample},
	{"app.json", AppJSON},
	{"docs/environment.md", EnvironmentDoc},
	{"deploy/nats-server.conf", NATSServerConf},
}

// NATSServerConf is the sample configuration of an external nats-server
// (NATS_URL) with the same roles as the embedded one, from shared/bus.
func NATSServerConf() ([]byte, error) {
	auth, err := bus.ServerConfig(false)
	if err != nil {
		return nil, err
	}
	return []byte(natsConfHeader + auth), nil
}

const natsConfHeader = `# nats-server configuration for an external NATS_URL, with the roles of
# BLACKSKY-MD's embedded bus: each of our services may publish only its own
# subjects, and the bots' credential may read events and send commands but
# never speak for WhatsApp (conn.*), a service (heartbeat.*) or the session
# (session.*). Without such a configuration the bus trusts every client.
#
#   NATS_TOKEN=... NATS_INTERNAL_SECRET=... nats-server -c nats-server.conf
#
# nats-server reads both passwords from its environment: give it the same
# values as BLACKSKY-MD. Our services connect as users gateway, backup and
# health with NATS_INTERNAL_SECRET. Bots connect as user "bot" with
# NATS_TOKEN as the password (nats://bot:TOKEN@host:4222): a nats-server
# cannot attach permissions to a bare token. For the sandbox
# (WHATSAPP_SANDBOX), add "blacksky.*.sandbox.link", "blacksky.*.sandbox.inject",
# "blacksky.*.sandbox.fault", "blacksky.*.sandbox.receipt" and
# "blacksky.*.sandbox.outbox" to the bot's publish list.
#
# Add TLS (tls { cert_file, key_file }) when clients reach it over the
# internet: passwords travel with every connection.
#
# Generated from shared/bus/roles.go by: go run ./deploy/gen (do not edit).

port: 4222

`

// ComposeFixed are the variables docker-compose.yml sets itself, per
// service, because the topology depends on them: .env cannot change them.
var ComposeFixed = map[string]map[string]string{
	"gateway": {"DATA_DIR": "/data", "NATS_LISTEN": "0.0.0.0:4222"},
	"backup":  {"DATA_DIR": "/data", "NATS_URL": "nats://gateway:4222"},
	"health":  {"DATA_DIR": "/data", "NATS_URL": "nats://gateway:4222"},
	"relay":   {"DATA_DIR": "/data", "NATS_URL": "nats://gateway:4222"},
}

// ComposeDefaults are the defaults docker-compose.yml uses where they differ
// from the binary's own (config.Vars); .env overrides them.
var ComposeDefaults = map[string]string{
	// A compose deployment is a deployment: JSON logs, stricter defaults.
	"NODE_ENV": "production",
	// The postgres service of the same file, with the password of .env.
	"DATABASE_URL": "postgres://blacksky:${POSTGRES_PASSWORD}@postgres:5432/blacksky?sslmode=disable",
}

// ComposeRequired are the variables docker compose refuses to start
// without (`${VAR:?...}`): NATS listens on 0.0.0.0 inside the network, its
// three processes share the internal secret of the bus' roles,
// production needs an encryption key for snapshots and a token for /pair, and
// the database holds the snapshots (plaintext without a key) and the lease.
var ComposeRequired = []string{"NATS_TOKEN", "NATS_INTERNAL_SECRET", "SESSION_ENCRYPTION_KEY", "HEALTH_TOKEN", "POSTGRES_PASSWORD"}

// ComposeOnlyVars are variables of .env that only docker-compose.yml reads,
// not the binary.
var ComposeOnlyVars = []config.Var{
	{Name: "POSTGRES_PASSWORD", Description: "Password of the compose postgres service; the compose default of " +
		"DATABASE_URL uses it. Hex characters only: it goes into a URL.", Secret: true, Generate: "secret"},
}

// lookupVar finds name in config.Vars, then in ComposeOnlyVars.
func lookupVar(name string) (config.Var, bool) {
	if v, ok := config.Lookup(name); ok {
		return v, true
	}
	for _, v := range ComposeOnlyVars {
		if v.Name == name {
			return v, true
		}
	}
	return config.Var{}, false
}

// HerokuOmitted are variables app.json must not set, with the reason.
var HerokuOmitted = map[string]string{
	"NATS_LISTEN":  "the default keeps the bus on loopback inside the dyno, on a free port if 4222 is taken",
	"DATABASE_URL": "set by the heroku-postgresql add-on",
	"PORT":         "set by Heroku on every dyno",
}

// HerokuValues are the app.json defaults that differ from config.Vars.
var HerokuValues = map[string]string{
	"NODE_ENV": "production",
	"HEROKU":   "true",
	// The image's DATA_DIR; a config var would override the image's ENV, and
	// ./data under the image's working directory may not be writable there.
	"DATA_DIR": "/data",
}

// composeDefault is the effective default of name under docker compose.
func composeDefault(v config.Var) string {
	if d, ok := ComposeDefaults[v.Name]; ok {
		return d
	}
	return v.Default
}

// composeFixedValue reports the value compose pins for name, if any.
func composeFixedValue(name string) (string, bool) {
	for _, svc := range []string{"gateway", "backup", "health"} {
		if val, ok := ComposeFixed[svc][name]; ok {
			return val, true
		}
	}
	return "", false
}

func isComposeRequired(name string) bool {
	for _, n := range ComposeRequired {
		if n == name {
			return true
		}
	}
	return false
}

// EnvExample renders .env.example: every variable, with its description and
// its default under docker compose. Only the required secrets are live
// lines; the rest are commented out so the defaults stay in one place.
func EnvExample() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(`# BLACKSKY-MD environment. Copy to .env for docker compose and fill in the
# four secrets below (each: openssl rand -hex 32). Every other line shows the
# default; uncomment it to change it. On Heroku, set these as config vars.
#
# Generated from shared/config.Vars by: go run ./deploy/gen (do not edit).

`)
	b.WriteString("# --- required by docker compose ---\n\n")
	for _, name := range ComposeRequired {
		v, ok := lookupVar(name)
		if !ok {
			return nil, fmt.Errorf("compose requires %s, which neither config.Vars nor ComposeOnlyVars know", name)
		}
		writeComment(&b, v.Description)
		b.WriteString("# Generate: openssl rand -hex 32\n")
		fmt.Fprintf(&b, "%s=\n\n", v.Name)
	}
	b.WriteString("# --- optional ---\n\n")
	for _, v := range config.Vars {
		if isComposeRequired(v.Name) {
			continue
		}
		writeComment(&b, v.Description)
		if fixed, ok := composeFixedValue(v.Name); ok {
			fmt.Fprintf(&b, "# docker compose sets this itself (%s); it matters for `blacksky run` elsewhere.\n", fixed)
			fmt.Fprintf(&b, "#%s=%s\n\n", v.Name, v.Default)
			continue
		}
		d := composeDefault(v)
		if d != v.Default {
			fmt.Fprintf(&b, "# Default under docker compose; the binary's own default is %q.\n", v.Default)
		}
		fmt.Fprintf(&b, "#%s=%s\n\n", v.Name, d)
	}
	return append(bytes.TrimRight(b.Bytes(), "\n"), '\n'), nil
}

func writeComment(b *bytes.Buffer, text string) {
	line := "#"
	for _, w := range strings.Fields(text) {
		if len(line)+1+len(w) > 78 && line != "#" {
			b.WriteString(line + "\n")
			line = "#"
		}
		line += " " + w
	}
	b.WriteString(line + "\n")
}

// AppEnv is one app.json env entry.
type AppEnv struct {
	Description string `json:"description"`
	// Value is nil only for generated values: Heroku fills those in.
	Value     *string `json:"value,omitempty"`
	Required  bool    `json:"required"`
	Generator string  `json:"generator,omitempty"`
}

// App is app.json, the manifest of the Deploy to Heroku button. Env keeps
// config.Vars' order, so it is written by hand in MarshalJSON.
type App struct {
	Name        string
	Description string
	Repository  string
	Keywords    []string
	Stack       string
	SuccessURL  string
	Formation   map[string]Formation
	Addons      []Addon
	EnvNames    []string
	Env         map[string]AppEnv
}

// Formation is one process type's dynos.
type Formation struct {
	Quantity int    `json:"quantity"`
	Size     string `json:"size"`
}

// Addon is one add-on the button provisions.
type Addon struct {
	Plan string `json:"plan"`
	As   string `json:"as,omitempty"`
}

// Repository is where the Deploy to Heroku button finds the code.
const Repository = "https://github.com/blacksky-md/blacksky"

// HerokuApp builds the app.json manifest from config.Vars.
func HerokuApp() App {
	app := App{
		Name:        "BLACKSKY-MD",
		Description: "A WhatsApp bot that stays online 24/7 and keeps its session in Heroku Postgres across restarts.",
		Repository:  Repository,
		Keywords:    []string{"whatsapp", "bot", "whatsmeow", "go", "nats"},
		Stack:       "container",
		SuccessURL:  "/pair",
		// One web dyno holds everything: the embedded NATS cannot span dynos,
		// and two sockets would fight over the session. basic never sleeps.
		Formation: map[string]Formation{"web": {Quantity: 1, Size: "basic"}},
		Addons:    []Addon{{Plan: "heroku-postgresql", As: "DATABASE"}},
		Env:       map[string]AppEnv{},
	}
	for _, v := range config.Vars {
		if _, omit := HerokuOmitted[v.Name]; omit {
			continue
		}
		value := v.Default
		if hv, ok := HerokuValues[v.Name]; ok {
			value = hv
		}
		// Heroku treats an entry as required unless told otherwise; only a
		// variable with a value (or a generated one) can be.
		e := AppEnv{Description: v.Description, Value: &value, Required: value != ""}
		if v.Generate != "" {
			e.Value, e.Generator, e.Required = nil, v.Generate, true
		}
		app.EnvNames = append(app.EnvNames, v.Name)
		app.Env[v.Name] = e
	}
	return app
}

// MarshalJSON writes the fields in the order a reader expects, env in
// config.Vars' order.
func (a App) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	field := func(name string, v any) error {
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(name)
		val, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("app.json %s: %w", name, err)
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(val)
		return nil
	}
	for _, f := range []struct {
		name string
		v    any
	}{
		{"name", a.Name}, {"description", a.Description}, {"repository", a.Repository},
		{"keywords", a.Keywords}, {"stack", a.Stack}, {"success_url", a.SuccessURL},
		{"formation", a.Formation}, {"addons", a.Addons},
	} {
		if err := field(f.name, f.v); err != nil {
			return nil, err
		}
	}
	b.WriteString(`,"env":{`)
	for i, name := range a.EnvNames {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(name)
		val, err := json.Marshal(a.Env[name])
		if err != nil {
			return nil, fmt.Errorf("app.json env %s: %w", name, err)
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(val)
	}
	b.WriteString("}}")
	return b.Bytes(), nil
}

// AppJSON renders app.json, indented.
func AppJSON() ([]byte, error) {
	raw, err := json.Marshal(HerokuApp())
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, raw, "", "  "); err != nil {
		return nil, fmt.Errorf("indent app.json: %w", err)
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// EnvTable renders the markdown table of every variable: name, default,
// description, and whether it is a secret.
func EnvTable() string {
	var b strings.Builder
	b.WriteString("| variable | default | secret | meaning |\n| --- | --- | --- | --- |\n")
	for _, v := range config.Vars {
		def := "empty"
		if v.Default != "" {
			def = "`" + v.Default + "`"
		}
		secret := ""
		if v.Secret {
			secret = "yes"
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s |\n", v.Name, def, secret, strings.ReplaceAll(v.Description, "|", `\|`))
	}
	return b.String()
}

// EnvironmentDoc renders docs/environment.md.
func EnvironmentDoc() ([]byte, error) {
	var b strings.Builder
	b.WriteString(`# Environment variables

<!-- Generated from shared/config.Vars by: go run ./deploy/gen (do not edit). -->

Every setting of BLACKSKY-MD is an environment variable. The names are the
ones the original BLACKSKY-MD used, so an existing Heroku config keeps working.
Durations take Go syntax (` + "`90s`, `30m`, `1h`" + `); booleans take
true/false, 1/0 or yes/no. A bad value stops the program with exit code 2 and a
message naming the variable and what it accepts (never the value of a secret).

`)
	b.WriteString(EnvTable())
	b.WriteString("\nWhere the deploy files differ from these defaults:\n\n")
	fmt.Fprintf(&b, "- docker compose (`docker-compose.yml`) pins %s; it defaults %s, and refuses to start without %s.\n",
		joinList(composeFixedList()), joinCode(pairs(ComposeDefaults)), joinCode(ComposeRequired))
	var generated []string
	for _, v := range config.Vars {
		if v.Generate != "" {
			generated = append(generated, v.Name)
		}
	}
	omitted := slices.Sorted(maps.Keys(HerokuOmitted))
	fmt.Fprintf(&b, "- Heroku (`app.json`) sets %s, generates %s (64 hex characters each), and leaves %s unset (%s).\n",
		joinCode(pairs(HerokuValues)), joinCode(generated), joinCode(omitted), heroOmitReasons(omitted))
	return []byte(b.String()), nil
}

// pairs renders a map as sorted NAME=value items.
func pairs(m map[string]string) []string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, k+"="+m[k])
	}
	return out
}

// composeFixedList renders ComposeFixed as "`NAME=value` (services)" items.
func composeFixedList() []string {
	on := map[string][]string{}
	for _, svc := range slices.Sorted(maps.Keys(ComposeFixed)) {
		for k, v := range ComposeFixed[svc] {
			item := k + "=" + v
			on[item] = append(on[item], svc)
		}
	}
	var out []string
	for _, item := range slices.Sorted(maps.Keys(on)) {
		out = append(out, "`"+item+"` ("+strings.Join(on[item], ", ")+")")
	}
	return out
}

func heroOmitReasons(names []string) string {
	var out []string
	for _, n := range names {
		out = append(out, "`"+n+"`: "+HerokuOmitted[n])
	}
	return strings.Join(out, "; ")
}

// joinCode renders items as `a`, `b` and `c`.
func joinCode(items []string) string {
	quoted := make([]string, len(items))
	for i, it := range items {
		quoted[i] = "`" + it + "`"
	}
	return joinList(quoted)
}

// joinList renders items as a, b and c.
func joinList(items []string) string {
	if len(items) < 2 {
		return strings.Join(items, "")
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}
