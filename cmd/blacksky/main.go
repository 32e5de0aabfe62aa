// Command blacksky keeps one WhatsApp bot online: one binary, one role per
// subcommand (run, gateway, backup, health, migrate, ...). See CONTRACT.md.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m := &Main{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}
	err := m.Run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "blacksky:", err)
	}
	os.Exit(ExitCode(err))
}
