package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/services/health"
	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/nats-io/nats.go"
)

// newHealth builds the HTTP service on ln (already bound to $PORT).
func (a *app) newHealth(nc *nats.Conn, ln net.Listener) (runner, error) {
	opts := health.Options{
		NC:                nc,
		Listener:          ln,
		Session:           a.cfg.SessionID,
		Instance:          a.instance,
		Version:           version,
		Clock:             a.clock,
		Log:               a.log.With("service", "health"),
		Token:             a.cfg.HealthToken,
		Production:        a.cfg.Production,
		Heroku:            a.cfg.Heroku,
		PublicURL:         a.cfg.HerokuAppURL,
		PairPhone:         a.cfg.PairPhone,
		HealthCheck:       a.cfg.EnableHealthCheck,
		Sandbox:           a.cfg.WhatsAppSandbox,
		BackupEnabled:     a.cfg.EnableSessionBackup,
		KeepAwakeURL:      a.cfg.HerokuAppURL,
		KeepAwakeInterval: a.cfg.KeepAwakeInterval,
		Secrets:           a.cfg.Secrets(),
	}
	if a.cfg.DatabaseURL != "" {
		ui, err := health.NewRiverUI(a.cfg.PostgresURL(), 2, a.log.With("service", "riverui"))
		if err != nil {
			// The UI is a convenience: without it the bot and health go on.
			a.log.Warn("river ui disabled", "err", err)
		} else {
			opts.RiverUI = ui
		}
	}
	svc, err := health.New(opts)
	if err != nil {
		if opts.RiverUI != nil {
			opts.RiverUI.Close()
		}
		return nil, err
	}
	return svc, nil
}

// cmdHealthcheck exits 0 when /healthz answers 200, for a Docker HEALTHCHECK
// in an image without curl. It reads PORT leniently: a healthcheck must not
// fail because some unrelated variable is bad.
func (m *Main) cmdHealthcheck(ctx context.Context, args []string) error {
	port := 8080
	if p, err := strconv.Atoi(strings.TrimSpace(m.Getenv("PORT"))); err == nil && p > 0 && p < 65536 {
		port = p
	}
	fs := m.flags("healthcheck")
	target := fs.String("url", "http://127.0.0.1:"+strconv.Itoa(port)+"/healthz", "URL to check")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	u, err := url.Parse(*target)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return &UsageError{Msg: fmt.Sprintf("healthcheck: --url wants an http(s) URL, got %q", config.RedactURL(*target))}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, *target, nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	req.Header.Set("User-Agent", "blacksky-healthcheck")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is printed once, redacted, below
		}
		return fmt.Errorf("healthcheck: %s: %w", config.RedactURL(*target), err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s", config.RedactURL(*target), resp.Status)
	}
	fmt.Fprintln(m.Stdout, "ok")
	return nil
}
