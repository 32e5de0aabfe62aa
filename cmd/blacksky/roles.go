package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/config"
)

// runner is a service: Run blocks until ctx ends and its own graceful stop
// (socket closed, shutdown snapshot taken, ...) is done.
type runner interface {
	Run(ctx context.Context) error
}

// memoryLimit applies ENABLE_MEMORY_OPTIMIZATION: the Go memory limit follows
// the container's (cgroup) limit unless GOMEMLIMIT says otherwise.
func (m *Main) memoryLimit(a *app) {
	if !a.cfg.EnableMemoryOptimization || m.Getenv("GOMEMLIMIT") != "" {
		return
	}
	limit, err := memlimit.Set(
		memlimit.WithRatio(0.9),
		memlimit.WithProvider(memlimit.FromCgroup),
		memlimit.WithLogger(slog.New(slog.DiscardHandler)),
	)
	if err != nil || limit <= 0 || limit == math.MaxInt64 {
		a.log.Debug("no container memory limit found; Go memory limit left as is")
		return
	}
	a.log.Info("go memory limit set from the container", "limit_bytes", limit)
}

// stage is one service in the shutdown order.
type stage struct {
	name   string
	r      runner
	share  float64 // of SHUTDOWN_TIMEOUT this stage may take to stop; 0: what is left
	cancel context.CancelFunc
	done   chan error
}

// supervisor starts services and stops them in reverse start order within
// SHUTDOWN_TIMEOUT, so the gateway closes its socket before backup takes the
// shutdown snapshot, and health answers until the end.
type supervisor struct {
	log    *slog.Logger
	stages []*stage
	failed chan string
}

func newSupervisor(log *slog.Logger) *supervisor {
	return &supervisor{log: log, failed: make(chan string, 8)}
}

// gatewayStopShare caps the gateway's stop: a socket that hangs on close must
// not eat the time the shutdown snapshot after it needs.
const gatewayStopShare = 0.25

func (s *supervisor) start(name string, r runner) {
	ctx, cancel := context.WithCancel(context.Background())
	st := &stage{name: name, r: r, cancel: cancel, done: make(chan error, 1)}
	if name == "gateway" {
		st.share = gatewayStopShare
	}
	s.stages = append(s.stages, st)
	go func() {
		err := r.Run(ctx)
		st.done <- err
		if ctx.Err() == nil {
			s.failed <- name
		}
	}()
}

// wait blocks until ctx ends (a signal) or a service stops by itself, then
// stops everything; it returns the first service error. A stage that does not
// stop within its share is left behind and the next one is stopped anyway.
func (s *supervisor) wait(ctx context.Context, timeout time.Duration) error {
	var cause error
	note := func(err error) {
		if cause == nil || errors.Is(cause, errUnexpected) {
			cause = err
		}
	}
	select {
	case <-ctx.Done():
		s.log.Info("shutting down", "timeout", timeout)
	case name := <-s.failed:
		s.log.Error("service stopped; shutting down", "service", name)
		cause = fmt.Errorf("%s: %w", name, errUnexpected)
	}
	overall := time.Now().Add(timeout)
	for i := len(s.stages) - 1; i >= 0; i-- {
		st := s.stages[i]
		st.cancel()
		budget := time.Until(overall)
		if st.share > 0 {
			budget = min(budget, time.Duration(st.share*float64(timeout)))
		}
		timer := time.NewTimer(budget)
		select {
		case err := <-st.done:
			if err != nil && !errors.Is(err, context.Canceled) {
				s.log.Error("service stopped with an error", "service", st.name, "err", err)
				note(prefixed(st.name, err))
			}
		case <-timer.C:
			s.log.Error("service did not stop in time; going on", "service", st.name)
			note(fmt.Errorf("shutdown: %s did not stop within its share of SHUTDOWN_TIMEOUT (%s)", st.name, timeout))
		}
		timer.Stop()
	}
	return cause
}

var errUnexpected = errors.New("stopped unexpectedly")

// prefixed puts the service's name before err unless the service already
// did ("backup: DATA_DIR: ...", not "backup: backup: DATA_DIR: ...").
func prefixed(name string, err error) error {
	if strings.HasPrefix(err.Error(), name+":") {
		return err
	}
	return fmt.Errorf("%s: %w", name, err)
}

// listenHTTP binds $PORT first thing: Heroku kills a web dyno that has not
// bound it within 60 s, and the health answers must come early.
func (a *app) listenHTTP() (net.Listener, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(a.cfg.Port)))
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, &config.Error{Var: "PORT", Accepts: "a port no other program listens on",
			Got: strconv.Itoa(a.cfg.Port) + " (already in use: another blacksky or server runs there; stop it or choose another PORT)"}
	}
	if err != nil {
		return nil, fmt.Errorf("listen on PORT %d: %w", a.cfg.Port, err)
	}
	if tcp, ok := ln.Addr().(*net.TCPAddr); ok {
		a.pairURL = pairURL(a.cfg, tcp.Port)
	}
	return ln, nil
}

// cmdRun is everything in one process: embedded NATS (on NATS_LISTEN,
// loopback by default, announced in bus.json; or an external NATS_URL),
// health, backup, relay, gateway.
func (m *Main) cmdRun(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("run"), args); err != nil {
		return err
	}
	a, err := m.setup("run")
	if err != nil {
		return err
	}
	if err := a.cfg.RequireDatabase(); err != nil {
		return err
	}
	m.memoryLimit(a)
	ln, err := a.listenHTTP()
	if err != nil {
		return err
	}
	roles := []bus.Role{bus.RoleHealth, bus.RoleGateway, bus.RoleRelay}
	if a.cfg.EnableSessionBackup {
		roles = append(roles, bus.RoleBackup)
	}
	bh, err := a.busFor(m.natsListen(a.cfg), roles...)
	if err != nil {
		ln.Close()
		return err
	}
	defer bh.close()

	sup := newSupervisor(a.log)
	h, err := a.newHealth(bh.conn(bus.RoleHealth), ln)
	if err != nil {
		ln.Close()
		return err
	}
	sup.start("health", h)
	if a.cfg.EnableSessionBackup {
		b, err := a.newBackup(bh.conn(bus.RoleBackup))
		if err != nil {
			sup.wait(canceled(), a.cfg.ShutdownTimeout)
			return err
		}
		sup.start("backup", b)
	}
	// relay starts before the gateway (which waits until relay is ready,
	// within relayStartWait) and stops after it: the gateway acknowledges
	// a message to WhatsApp only once relay has stored it.
	r, err := a.newRelay(bh.conn(bus.RoleRelay))
	if err != nil {
		sup.wait(canceled(), a.cfg.ShutdownTimeout)
		return err
	}
	sup.start("relay", r)
	a.awaitRelay(ctx, r)
	g, err := a.newGateway(bh.conn(bus.RoleGateway))
	if err != nil {
		sup.wait(canceled(), a.cfg.ShutdownTimeout)
		return err
	}
	sup.start("gateway", g)
	m.ready(bh.readyInfo(ln.Addr().String()))
	return sup.wait(ctx, a.cfg.ShutdownTimeout)
}

// cmdGateway owns the WhatsApp socket and the embedded NATS server.
func (m *Main) cmdGateway(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("gateway"), args); err != nil {
		return err
	}
	a, err := m.setup("gateway")
	if err != nil {
		return err
	}
	m.memoryLimit(a)
	bh, err := a.busFor(m.natsListen(a.cfg), bus.RoleGateway)
	if err != nil {
		return err
	}
	defer bh.close()
	if bh.srv != nil && a.cfg.NATSInternalSecret == "" {
		a.log.Warn("NATS_INTERNAL_SECRET is not set: a generated one guards the bus, so backup and health " +
			"processes cannot join it; set the same NATS_INTERNAL_SECRET in every process")
	}
	g, err := a.newGateway(bh.conn(bus.RoleGateway))
	if err != nil {
		return err
	}
	sup := newSupervisor(a.log)
	sup.start("gateway", g)
	m.ready(bh.readyInfo(""))
	return sup.wait(ctx, a.cfg.ShutdownTimeout)
}

// cmdBackup runs the snapshot and restore workers against NATS_URL.
func (m *Main) cmdBackup(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("backup"), args); err != nil {
		return err
	}
	a, err := m.setup("backup")
	if err != nil {
		return err
	}
	if err := a.cfg.RequireDatabase(); err != nil {
		return err
	}
	m.memoryLimit(a)
	bh, err := a.serviceBus(bus.RoleBackup)
	if err != nil {
		return err
	}
	defer bh.close()
	b, err := a.newBackup(bh.conn(bus.RoleBackup))
	if err != nil {
		return err
	}
	sup := newSupervisor(a.log)
	sup.start("backup", b)
	m.ready(ReadyInfo{})
	return sup.wait(ctx, a.cfg.ShutdownTimeout)
}

// cmdHealth serves HTTP on $PORT against NATS_URL.
func (m *Main) cmdHealth(ctx context.Context, args []string) error {
	if err := parseFlags(m.flags("health"), args); err != nil {
		return err
	}
	a, err := m.setup("health")
	if err != nil {
		return err
	}
	m.memoryLimit(a)
	ln, err := a.listenHTTP()
	if err != nil {
		return err
	}
	bh, err := a.serviceBus(bus.RoleHealth)
	if err != nil {
		ln.Close()
		return err
	}
	defer bh.close()
	h, err := a.newHealth(bh.conn(bus.RoleHealth), ln)
	if err != nil {
		ln.Close()
		return err
	}
	sup := newSupervisor(a.log)
	sup.start("health", h)
	m.ready(ReadyInfo{HTTPAddr: ln.Addr().String()})
	return sup.wait(ctx, a.cfg.ShutdownTimeout)
}

func (m *Main) ready(info ReadyInfo) {
	if m.Ready != nil {
		m.Ready(info)
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
