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
}

// ReadyInfo tells a test where a started role listens.
type ReadyInfo struct {
	HTTPAddr string // health service, when started
	NATSURL  string // embedded NATS for other processes, when listening
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

const usage = `usage: blacksky [command] [flags]

commands:
  run          everything in one process (default)
  gateway      the WhatsApp socket owner, with the embedded NATS server
  backup       snapshot and restore workers
  health       the HTTP service on $PORT
  migrate      create or upgrade every table
  backup-now   ask for a snapshot and print the reply [--reason R] [--timeout D]
  snapshots    list stored snapshots, newest first
  restore      write a snapshot into the session path [--id N] [--force]
  healthcheck  exit 0 if /healthz answers 200 [--url U]
  version      print version, commit and Go version
`

// Run dispatches to one command.
func (m *Main) Run(ctx context.Context, args []string) error {
	cmd := "run"
	if len(args) > 0 && (!strings.HasPrefix(args[0], "-") || args[0] == "-h" || args[0] == "--help") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return m.cmdRun(ctx, args)
	case "gateway":
		return m.cmdGateway(ctx, args)
	case "backup":
		return m.cmdBackup(ctx, args)
	case "health":
		return m.cmdHealth(ctx, args)
	case "migrate":
		return m.cmdMigrate(ctx, args)
	case "backup-now":
		return m.cmdBackupNow(ctx, args)
	case "snapshots":
		return m.cmdSnapshots(ctx, args)
	case "restore":
		return m.cmdRestore(ctx, args)
	case "healthcheck":
		return m.cmdHealthcheck(ctx, args)
	case "version":
		return m.cmdVersion(args)
	case "help", "-h", "--help":
		fmt.Fprint(m.Stdout, usage)
		return nil
	default:
		fmt.Fprint(m.Stderr, usage)
		return &UsageError{Msg: fmt.Sprintf("unknown command %q", cmd)}
	}
}

// flags returns a FlagSet whose errors become UsageErrors.
func (m *Main) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("blacksky "+name, flag.ContinueOnError)
	fs.SetOutput(m.Stderr)
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &UsageError{Msg: "help requested"}
		}
		return &UsageError{Msg: err.Error()}
	}
	if fs.NArg() > 0 {
		return &UsageError{Msg: fmt.Sprintf("%s: unexpected argument %q", fs.Name(), fs.Arg(0))}
	}
	return nil
}

// app is what every role shares: the parsed config, the logger, who we are.
type app struct {
	cfg      *config.Config
	log      *slog.Logger
	clock    clockwork.Clock
	instance string
	stdout   io.Writer
	role     string
}

// setup loads the config and builds the logger for a role.
func (m *Main) setup(role string) (*app, error) {
	cfg, err := config.Load(m.Getenv)
	if err != nil {
		return nil, err
	}
	log := logging.New(m.Stderr, logging.Options{Level: cfg.LogLevel, Format: cfg.LogFormat, Secrets: cfg.Secrets()})
	clock := m.Clock
	if clock == nil {
		clock = clockwork.NewRealClock()
	}
	return &app{
		cfg:      cfg,
		log:      log.With("role", role),
		clock:    clock,
		instance: m.instance(role),
		stdout:   m.Stdout,
		role:     role,
	}, nil
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
