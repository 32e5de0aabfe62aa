package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/blacksky-md/blacksky/internal/dboutage"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/services/relay/postgres"
	"github.com/blacksky-md/blacksky/services/relay/sqlite"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/nats-io/nats.go"
)

// openRelayStore connects relay to the database backup uses: DATABASE_URL,
// or the embedded SQLite in DATA_DIR.
func (a *app) openRelayStore(ctx context.Context) (relay.Store, error) {
	return a.openRelayStoreTraced(ctx, nil)
}

// openRelayStoreTraced is openRelayStore with tracer watching the
// PostgreSQL pool (relay's outage filter).
func (a *app) openRelayStoreTraced(ctx context.Context, tracer *dboutage.Outage) (relay.Store, error) {
	if a.cfg.DatabaseURL != "" {
		opts := postgres.Options{URL: a.cfg.PostgresURL(), MaxConns: a.cfg.DatabaseMaxConns}
		if tracer != nil {
			opts.Tracer = tracer
		}
		return postgres.Open(ctx, opts)
	}
	if err := os.MkdirAll(a.cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("DATA_DIR: %w", err)
	}
	return sqlite.Open(ctx, filepath.Join(a.cfg.DataDir, "blacksky.db"))
}

// schedule is the product's periodic jobs, the same for every River client
// (package jobs says why).
func (a *app) schedule() jobs.Schedule {
	if !a.cfg.EnableSessionBackup {
		return jobs.Schedule{}
	}
	return backupConfig(a.cfg).Schedule()
}

// relayStartWait bounds how long blacksky run holds the gateway back for
// relay: with its database down relay may take minutes, and the gateway
// still works meanwhile (messages stay unacknowledged until relay is back).
const relayStartWait = 30 * time.Second

// awaitRelay waits until relay is ready (its database open), it stopped,
// ctx ends or relayStartWait passes, so the gateway starts after relay.
func (a *app) awaitRelay(ctx context.Context, r *relay.Service) {
	t := time.NewTimer(relayStartWait) // real time: a bound on startup, not behaviour under test
	defer t.Stop()
	select {
	case <-r.Ready():
	case <-ctx.Done():
	case <-t.C:
		a.log.Warn("relay is not ready yet (its database?); starting the gateway anyway: "+
			"messages stay unacknowledged to WhatsApp until relay stores them", "waited", relayStartWait)
	}
}

// newRelay builds the relay service on nc.
func (a *app) newRelay(nc *nats.Conn) (*relay.Service, error) {
	if a.cfg.Production && len(a.cfg.SessionEncryptionKey) == 0 {
		a.log.Warn("SESSION_ENCRYPTION_KEY is not set: relay stores incoming messages and sends in plaintext")
	}
	// One outage filter hears the pool fail and quiets River's log of it.
	outage := dboutage.New(a.log.With("service", bus.ServiceRelay), "relay")
	return relay.New(relay.Options{
		Config: relay.Config{
			Session:         a.cfg.SessionID,
			Key:             a.cfg.SessionEncryptionKey,
			Retention:       a.cfg.MessageRetention,
			SendRate:        a.cfg.SendRate.Limit(),
			WebhookURL:      a.cfg.WebhookURL,
			WebhookSecret:   a.cfg.WebhookSecret,
			WebhookEvents:   a.cfg.WebhookEvents,
			WebhookRetryFor: a.cfg.WebhookRetryFor,
			// A fifth of the stop budget: backup stops after relay
			// and its shutdown snapshot needs most of what is left.
			StopGrace: a.cfg.ShutdownTimeout / 5,
		},
		NC:       nc,
		Log:      a.log,
		Clock:    a.clock,
		Instance: a.instance,
		Open:     func(ctx context.Context) (relay.Store, error) { return a.openRelayStoreTraced(ctx, outage) },
		Outage:   outage,
		Schedule: a.schedule(),
	})
}

// cmdRelay runs relay against NATS_URL.
func (m *Main) cmdRelay(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("relay"), args); err != nil {
		return err
	}
	a, err := m.setup("relay")
	if err != nil {
		return err
	}
	if err := a.cfg.RequireDatabase(); err != nil {
		return err
	}
	m.memoryLimit(a)
	bh, err := a.serviceBus(bus.RoleRelay)
	if err != nil {
		return err
	}
	defer bh.close()
	r, err := a.newRelay(bh.conn(bus.RoleRelay))
	if err != nil {
		return err
	}
	sup := newSupervisor(a.log)
	sup.start("relay", r)
	m.ready(ReadyInfo{})
	return sup.wait(ctx, a.cfg.ShutdownTimeout)
}

// clientRequest sends one request of a client command to the running
// relay and returns the reply's bytes, with errors that say where it asked.
func (m *Main) clientRequest(ctx context.Context, cmd, subject string, body []byte, timeout time.Duration) (*app, []byte, error) {
	c, err := m.dialClient(ctx, cmd, timeout)
	if err != nil {
		return nil, nil, err
	}
	defer c.close()
	data, err := c.request(ctx, subject, body)
	if err != nil {
		return nil, nil, err
	}
	return c.a, data, nil
}

// relayClient is a client command's connection to the running relay, for
// one or several requests.
type relayClient struct {
	a       *app
	nc      *nats.Conn
	target  busTarget
	cmd     string
	timeout time.Duration
}

// dialClient connects a client command to the bus, waiting up to timeout.
func (m *Main) dialClient(ctx context.Context, cmd string, timeout time.Duration) (*relayClient, error) {
	a, err := m.setup(cmd)
	if err != nil {
		return nil, err
	}
	nc, target, err := a.clientBus()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := waitConnected(cctx, nc, 5*time.Second); err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s: %w at %s", cmd, err, target.at())
	}
	return &relayClient{a: a, nc: nc, target: target, cmd: cmd, timeout: timeout}, nil
}

func (c *relayClient) close() { c.nc.Close() }

// request sends body to the session's subject and returns the reply's
// bytes, waiting up to the command's timeout.
func (c *relayClient) request(ctx context.Context, subject string, body []byte) ([]byte, error) {
	rctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	a, cmd, target := c.a, c.cmd, c.target
	full := bus.NewSubjects(a.cfg.SessionID).Prefix + "." + subject
	msg, err := c.nc.RequestWithContext(rctx, full, body)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return nil, fmt.Errorf("%s: no relay answers on %s at %s%s (is blacksky run or blacksky relay up?)", cmd, full, target.at(), a.sessionNote(target))
	case errors.Is(err, context.DeadlineExceeded):
		return nil, fmt.Errorf("%s: no reply on %s within %s at %s%s", cmd, full, c.timeout, target.at(), a.sessionNote(target))
	case err != nil:
		return nil, fmt.Errorf("%s: %w (at %s)", cmd, err, target.at())
	}
	return msg.Data, nil
}

// cmdMessages prints stored messages after a seq, one JSON object a line,
// as P.msg.in carries them. Relay answers a page at a time (fewer near the
// NATS payload limit): the command asks again after the last seq until a
// page comes back empty, or --limit messages are printed.
func (m *Main) cmdMessages(ctx context.Context, args []string) error {
	fs := m.flags("messages")
	after := fs.Int64("after", 0, "print the messages after this seq")
	limit := fs.Int("limit", 0, "print at most this many (0: every stored message after --after)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for each of relay's answers")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *limit < 0 {
		return &UsageError{Msg: "messages: --limit must be 0 or more"}
	}
	if _, err := bus.DecodeMsgReplay(replayBody(*after, 0)); err != nil {
		return &UsageError{Msg: "messages: " + err.Error()}
	}
	c, err := m.dialClient(ctx, "messages", *timeout)
	if err != nil {
		return err
	}
	defer c.close()
	enc := json.NewEncoder(c.a.stdout)
	next, printed := *after, 0
	for *limit == 0 || printed < *limit {
		ask := bus.MaxReplayLimit
		if *limit > 0 {
			ask = min(ask, *limit-printed)
		}
		data, err := c.request(ctx, "msg.replay", replayBody(next, ask))
		if err != nil {
			return err
		}
		var rep bus.MsgReplayReply
		if err := json.Unmarshal(data, &rep); err != nil {
			return fmt.Errorf("messages: bad reply: %w", err)
		}
		if !rep.OK {
			return fmt.Errorf("messages: %s", rep.Error)
		}
		if len(rep.Messages) == 0 {
			return nil
		}
		for _, msg := range rep.Messages {
			if msg.Seq <= next {
				return fmt.Errorf("messages: relay answered seq %d after asking past %d; stopped", msg.Seq, next)
			}
			if err := enc.Encode(msg); err != nil {
				return err
			}
			next = msg.Seq
			printed++
		}
	}
	return nil
}

// replayBody is a P.msg.replay request (its fields always encode).
func replayBody(after int64, limit int) []byte {
	b, _ := json.Marshal(bus.MsgReplayRequest{AfterSeq: after, Limit: limit})
	return b
}

// cmdDeliveries is "deliveries retry": dead deliveries go out again.
func (m *Main) cmdDeliveries(ctx context.Context, args []string) error {
	fs := m.flags("deliveries")
	timeout := fs.Duration("timeout", time.Minute, "how long to wait for relay's answer")
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		return &helpRequest{fs: fs}
	}
	if len(args) == 0 || args[0] != "retry" {
		return &UsageError{Msg: "deliveries: want the subcommand retry (blacksky deliveries retry)"}
	}
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	a, data, err := m.clientRequest(ctx, "deliveries", "relay.retry", []byte(`{}`), *timeout)
	if err != nil {
		return err
	}
	fmt.Fprintln(a.stdout, string(data))
	var rep bus.RelayRetryReply
	if err := json.Unmarshal(data, &rep); err != nil {
		return fmt.Errorf("deliveries retry: bad reply: %w", err)
	}
	if !rep.OK {
		return fmt.Errorf("deliveries retry: %s", rep.Error)
	}
	return nil
}
