// Command blacksky keeps one WhatsApp bot online: one binary, one role per
// subcommand (run, gateway, backup, health, migrate, ...). See CONTRACT.md.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/blacksky-md/blacksky/shared/logging"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m := &Main{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}
	err := m.Run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, exitMessage(err, os.Getenv))
	}
	os.Exit(ExitCode(err))
}

// exitMessage is the line printed for the error Run returned, with every
// secret of the environment hidden: errors of libraries (a NATS URL parse
// error, a driver's) may quote a variable whole.
func exitMessage(err error, getenv config.Getenv) string {
	var secrets []string
	for _, s := range config.EnvSecrets(getenv) {
		if len(s) >= 4 { // as the logger: shorter values would mangle ordinary text
			secrets = append(secrets, s)
		}
	}
	return logging.Redact("blacksky: "+err.Error(), secrets)
}
