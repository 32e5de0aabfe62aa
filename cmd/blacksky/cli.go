package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/blacksky-md/blacksky/shared/logging"
	"github.com/jonboulle/clockwork"
)

// Set by the linker: -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = ""
)

// Main is the program; tests run it with their own environment and writers.
type Main struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	// Clock is the time source of every service; nil means the real clock.
	Clock clockwork.Clock
	// Ready, when set, is called once a long-running role has bound its
	// ports and started its services (tests wait on it instead of sleeping).
	Ready func(info ReadyInfo)
	// DefaultNATSListen, when set, replaces NATS_LISTEN's default
	// (127.0.0.1:4222) while the variable is unset: tests choose the port.
	DefaultNATSListen string
}

// ReadyInfo tells a test where a started role listens.
type ReadyInfo struct {
	HTTPAddr string // health service, when started
	NATSURL  string // embedded NATS for other processes, when listening
	// NATSToken is the bots' credential the embedded bus accepts
	// (NATS_TOKEN or the generated one).
	NATSToken string
}

// UsageError is a bad command line: exit code 2.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// ExitCode maps an error from Main.Run to the contract's exit codes.
func ExitCode(err error) int {
	var u *UsageError
	var coded interface{ ExitCode() int }
	switch {
	case err == nil:
		return 0
	case errors.As(err, &coded):
		return coded.ExitCode()
	case config.IsError(err), errors.As(err, &u):
		return 2
	default:
		return 1
	}
}

// commands is the command line: name, flags in brief, what it does. The
// top-level usage and each command's --help are printed from it.
var commands = []struct{ name, brief, about string }{
	{"run", "", "everything in one process (default): embedded NATS, health on $PORT, backup, relay and the gateway"},
	{"gateway", "", "the WhatsApp socket owner, with the embedded NATS server"},
	{"backup", "", "snapshot and restore workers"},
	{"relay", "", "stores incoming messages, delivers them (bus, JetStream, webhook) and queues sends"},
	{"health", "", "the HTTP service on $PORT"},
	{"migrate", "", "create or upgrade every table (Heroku's release phase runs it)"},
	{"backup-now", "[--reason R] [--timeout D]", "ask the running backup service for a snapshot and print the reply"},
	{"snapshots", "", "list stored points (base, delta) and full snapshots, newest first"},
	{"messages", "[--after N] [--limit L] [--timeout D]", "print the stored messages after seq N (all of them, or at most L), one JSON object a line, as on P.msg.in"},
	{"deliveries", "retry [--timeout D]", "send dead deliveries (webhook or bus) again"},
	{"restore", "[--id N|pN] [--at T] [--force] [--ignore-lease]", "write a snapshot or point into the session path"},
	{"sandbox", "link | inject | fault KIND | receipt | outbox", "drive the WhatsApp sandbox of a running gateway (WHATSAPP_SANDBOX=true)"},
	{"healthcheck", "[--url U] [--timeout D]", "exit 0 if /healthz answers 200"},
	{"version", "", "print version, commit and Go version"},
}

// usage is the top-level help.
func usage() string {
	var b strings.Builder
	b.WriteString("usage: blacksky [command] [flags]\n\ncommands:\n")
	for _, c := range commands {
		line := c.about
		if c.brief != "" {
			line += " " + c.brief
		}
		fmt.Fprintf(&b, "  %-12s %s\n", c.name, line)
	}
	b.WriteString("\nblacksky <command> --help shows one command's flags. Settings come from the\nenvironment: docs/environment.md.\n")
	return b.String()
}

// Run dispatches to one command.
func (m *Main) Run(ctx context.Context, args []string) error {
	cmd := "run"
	if len(args) > 0 && (!strings.HasPrefix(args[0], "-") || args[0] == "-h" || args[0] == "--help") {
		cmd, args = args[0], args[1:]
	}
	if cmd == "help" && len(args) == 1 { // blacksky help <command>
		cmd, args = args[0], []string{"--help"}
	}
	err := m.dispatch(ctx, cmd, args)
	var h *helpRequest
	if errors.As(err, &h) {
		m.commandUsage(h.fs)
		return nil
	}
	return err
}

func (m *Main) dispatch(ctx context.Context, cmd string, args []string) error {
	switch cmd {
	case "run":
		return m.cmdRun(ctx, args)
	case "gateway":
		return m.cmdGateway(ctx, args)
	case "backup":
		return m.cmdBackup(ctx, args)
	case "health":
		return m.cmdHealth(ctx, args)
	case "relay":
		return m.cmdRelay(ctx, args)
	case "messages":
		return m.cmdMessages(ctx, args)
	case "deliveries":
		return m.cmdDeliveries(ctx, args)
	case "migrate":
		return m.cmdMigrate(ctx, args)
	case "backup-now":
		return m.cmdBackupNow(ctx, args)
	case "snapshots":
		return m.cmdSnapshots(ctx, args)
	case "restore":
		return m.cmdRestore(ctx, args)
	case "sandbox":
		return m.cmdSandbox(ctx, args)
	case "healthcheck":
		return m.cmdHealthcheck(ctx, args)
	case "version":
		return m.cmdVersion(args)
	case "help", "-h", "--help":
		fmt.Fprint(m.Stdout, usage())
		return nil
	default:
		fmt.Fprint(m.Stderr, usage())
		return &UsageError{Msg: fmt.Sprintf("unknown command %q", cmd)}
	}
}

// flags returns a FlagSet whose errors become UsageErrors and whose -h and
// --help print the command's usage on stdout (see commandUsage).
func (m *Main) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("blacksky "+name, flag.ContinueOnError)
	// The flag package would print errors and usage itself; the error is
	// printed once by main, the usage by Run.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// helpRequest is -h or --help: Run prints the command's usage and exits 0.
type helpRequest struct{ fs *flag.FlagSet }

func (h *helpRequest) Error() string { return h.fs.Name() + ": help requested" }

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &helpRequest{fs: fs}
		}
		return &UsageError{Msg: fmt.Sprintf("%s: %v (%s --help lists the flags)", commandName(fs), err, fs.Name())}
	}
	if fs.NArg() > 0 {
		return &UsageError{Msg: fmt.Sprintf("%s: unexpected argument %q (%s --help lists the flags)", commandName(fs), fs.Arg(0), fs.Name())}
	}
	return nil
}

// commandName is the command a FlagSet from flags parses ("run"); main
// puts "blacksky:" before every error already.
func commandName(fs *flag.FlagSet) string { return strings.TrimPrefix(fs.Name(), "blacksky ") }

// commandUsage prints one command's usage and flags on stdout.
func (m *Main) commandUsage(fs *flag.FlagSet) {
	name := commandName(fs)
	for _, c := range commands {
		if c.name == name {
			fmt.Fprintf(m.Stdout, "usage: %s\n\n%s.\n", strings.TrimSpace("blacksky "+c.name+" "+c.brief), c.about)
		}
	}
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n == 0 {
		fmt.Fprintln(m.Stdout, "\nNo flags: the environment configures it (docs/environment.md).")
		return
	}
	fmt.Fprintln(m.Stdout, "\nflags:")
	fs.SetOutput(m.Stdout)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// app is what every role shares: the parsed config, the logger, who we are.
type app struct {
	cfg      *config.Config
	log      *slog.Logger
	clock    clockwork.Clock
	instance string
	stdout   io.Writer
	role     string
	// sessionSet: SESSION_ID was given; otherwise a client takes the
	// session of the process that wrote bus.json.
	sessionSet bool
	// pairURL is where a person links the session: HEROKU_APP_URL, else
	// http://localhost:$PORT, followed by /pair. listenHTTP corrects the
	// port to the one it bound (PORT=0 picks a free one).
	pairURL string
}

// setup loads the config and builds the logger for a role, and refuses a
// DATA_DIR the role cannot write in before anything starts.
func (m *Main) setup(role string) (*app, error) {
	cfg, err := config.Load(m.Getenv)
	if err != nil {
		return nil, err
	}
	if writesDataDir(role, cfg) {
		if err := config.CheckDataDir(cfg.DataDir); err != nil {
			return nil, err
		}
	}
	log := logging.New(m.Stderr, logging.Options{Level: cfg.LogLevel, Format: cfg.LogFormat, Secrets: cfg.Secrets()})
	clock := m.Clock
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	a := &app{
		cfg:      cfg,
		log:      log.With("role", role),
		clock:    clock,
		instance: m.instance(role),
		stdout:   m.Stdout,
		role:     role,
		pairURL:  pairURL(cfg, cfg.Port),
		// SESSION_ID has a default; a client must know whether it was set.
		sessionSet: strings.TrimSpace(m.Getenv("SESSION_ID")) != "",
	}
	if servesHTTP(role) && cfg.Production && cfg.HealthToken == "" {
		a.log.Warn("HEALTH_TOKEN is not set: in production /pair, /riverui/ and the detailed /status answer 403 until it is (set it to a long random string: openssl rand -hex 32)")
	}
	return a, nil
}

// writesDataDir says which commands write under DATA_DIR: the session store,
// the local snapshot fallback, and the embedded SQLite when DATABASE_URL is
// empty.
func writesDataDir(role string, cfg *config.Config) bool {
	switch role {
	case "run", "gateway", "backup", "restore":
		return true
	case "migrate", "relay":
		return cfg.DatabaseURL == ""
	}
	return false
}

// servesHTTP says which commands run the health service.
func servesHTTP(role string) bool { return role == "run" || role == "health" }

// pairURL is the /pair page as a person reaches it, with the health
// service on port.
func pairURL(cfg *config.Config, port int) string {
	if cfg.HerokuAppURL != "" {
		return strings.TrimRight(cfg.HerokuAppURL, "/") + "/pair"
	}
	return "http://localhost:" + strconv.Itoa(port) + "/pair"
}

// instance names this process and is the lease holder's identity, so it
// must differ between any two processes: during a Heroku preboot the new dyno
// has the same DYNO name (web.1) as the old one, and two containers may have
// the same pid, hence the random suffix.
func (m *Main) instance(role string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	suffix := hex.EncodeToString(b[:])
	if d := m.Getenv("DYNO"); d != "" {
		return d + "-" + suffix
	}
	host := m.Getenv("HOSTNAME")
	if host == "" {
		host, _ = os.Hostname()
	}
	return host + "-" + role + "-" + strconv.Itoa(os.Getpid()) + "-" + suffix
}

func (m *Main) cmdVersion(args []string) error {
	if err := parseFlags(m.flags("version"), args); err != nil {
		return err
	}
	c := commit
	if c == "" {
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" {
					c = s.Value
				}
			}
		}
	}
	if c == "" {
		c = "unknown"
	}
	fmt.Fprintf(m.Stdout, "blacksky %s (commit %s, %s)\n", version, c, runtime.Version())
	return nil
}
