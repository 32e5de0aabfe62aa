package bus_test

import (
	"encoding/json"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// BenchmarkEventDelivery measures an event published by one connection and
// received by a subscriber on another: JSON encode, publish, route, deliver,
// JSON decode. Each mode runs over the in-process transport `blacksky run`
// uses and over TCP loopback (`blacksky gateway` with NATS_LISTEN).
//
//   - latency: one event in flight at a time, the unloaded one-way delay.
//   - throughput: up to 1024 events in flight; events/s, and the delay an
//     event sees when the bus is saturated (queueing included).
//
// Run: go test -run '^$' -bench EventDelivery -benchtime 2s ./shared/bus
func BenchmarkEventDelivery(b *testing.B) {
	for _, transport := range []string{"inproc", "tcp"} {
		for _, mode := range []struct {
			name   string
			window int
		}{{"latency", 1}, {"throughput", 1024}} {
			b.Run(transport+"/"+mode.name, func(b *testing.B) {
				pub, sub := benchConns(b, transport)
				benchDelivery(b, pub, sub, mode.window)
			})
		}
	}
}

const benchSecret = "bench-internal-secret"

func benchConns(b *testing.B, transport string) (pub, sub *nats.Conn) {
	b.Helper()
	log := slog.New(slog.DiscardHandler)
	opts := bus.ServerOptions{Token: "bench-bots-token", InternalSecret: benchSecret}
	if transport == "tcp" {
		opts.Listen = "127.0.0.1:0"
	}
	srv, err := bus.StartServer(opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(srv.Shutdown)
	// As in production: the gateway publishes, a bot listens, both
	// checked against their permissions.
	connect := func(role bus.Role) *nats.Conn {
		var nc *nats.Conn
		var err error
		if transport == "tcp" {
			cred := bus.BotCredential(srv.BotToken())
			if role != bus.RoleBot {
				cred = bus.RoleCredential(role, benchSecret)
			}
			nc, err = bus.ConnectWith(srv.ClientURL(), cred, string(role), log)
		} else {
			nc, err = srv.ConnectAs(role, string(role), log)
		}
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(nc.Close)
		return nc
	}
	return connect(bus.RoleGateway), connect(bus.RoleBot)
}

func benchDelivery(b *testing.B, pub, subConn *nats.Conn, window int) {
	subj := bus.NewSubjects("bench")
	subject := subj.Conn(bus.ConnReconnecting)
	lat := make([]time.Duration, 0, b.N)
	slots := make(chan struct{}, window)
	done := make(chan struct{})
	received := 0
	sub, err := subConn.Subscribe(subject, func(m *nats.Msg) {
		var e bus.ConnEvent
		if err := json.Unmarshal(m.Data, &e); err != nil {
			b.Error(err)
		}
		lat = append(lat, time.Since(e.At))
		received++
		<-slots
		if received == b.N {
			close(done)
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := subConn.Flush(); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		slots <- struct{}{}
		e := bus.ConnEvent{Kind: bus.ConnReconnecting, Attempt: i + 1, DelayMS: 1500}
		e.Stamp("BLACKSKY-MD", time.Now())
		if err := bus.Publish(pub, subject, e); err != nil {
			b.Fatal(err)
		}
		if window > 1 && i%window == window-1 {
			// nats.go buffers publishes until its flusher runs; nudge it
			// as a busy publisher's writes would.
			if err := pub.FlushTimeout(10 * time.Second); err != nil {
				b.Fatal(err)
			}
		}
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("received %d of %d events", received, b.N)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e3 }
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "events/s")
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
}
