package gateway

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// Messages whatsmeow hands over right before SIGTERM are stored by relay
// (and so on P.msg.in), all of them, before conn.stopped, even while the
// loop is busy: the handler does not depend on the loop.
func TestMessagesBeforeShutdownAreStoredBeforeStopped(t *testing.T) {
	tests := []struct {
		name string
		n    int
	}{
		{"a few", 5},
		{"many", 2000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gate := make(chan struct{})
			h := start(t, func(_ *Config, c *fakeConn) { c.gate = gate })
			// One channel for both subjects: the connection's read loop
			// fills it in the order the gateway published.
			ch := make(chan *nats.Msg, tt.n+1000)
			for _, s := range []string{h.subj.MsgIn(), h.subj.ConnAll()} {
				sub, err := h.nc.ChanSubscribe(s, ch)
				if err != nil {
					t.Fatal(err)
				}
				defer sub.Unsubscribe()
			}
			if err := h.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			// The loop is busy in Connect while the messages arrive.
			testwait.For(t, 5*time.Second, "Connect to be called", func() bool {
				return h.conn.get(func(f *fakeConn) int { return f.inConnect }) == 1
			})
			for i := range tt.n {
				if !h.conn.emit(textMsg(fmt.Sprintf("m%d", i), "15557770000", "hi")) {
					t.Fatalf("message %d not acknowledged", i)
				}
			}
			h.stop()
			close(gate)
			h.shutdown()

			seen := map[string]bool{}
			deadline := time.After(10 * time.Second)
			for stopped := false; !stopped; {
				select {
				case m := <-ch:
					switch {
					case m.Subject == h.subj.MsgIn():
						seen[string(m.Data)] = true
					case strings.HasSuffix(m.Subject, "."+bus.ConnStopped):
						stopped = true
					}
				case <-deadline:
					t.Fatal("no conn.stopped")
				}
			}
			if len(seen) != tt.n {
				t.Fatalf("msg.in before conn.stopped: %d, want %d", len(seen), tt.n)
			}
		})
	}
}

// A send that reached WhatsApp when shutdown begins gets a grace period to
// be answered truthfully; new sends are refused as "shutting down".
func TestShutdownSendGrace(t *testing.T) {
	const body = `{"to":"15551234567","text":"slow"}`
	tests := []struct {
		name   string
		during func(t *testing.T, h *harness) // shutdown has begun, the send is in flight
		wantOK bool
		errHas string
	}{
		{
			name:   "released within the grace: ok",
			during: func(*testing.T, *harness) {},
			wantOK: true,
		},
		{
			name: "new sends are refused meanwhile",
			during: func(t *testing.T, h *harness) {
				if r := h.request(`{"to":"15551234567","text":"late"}`); r.OK || !strings.Contains(r.Error, "shutting down") {
					t.Fatalf("send after shutdown began: %+v", r)
				}
			},
			wantOK: true,
		},
		{
			name: "grace runs out: cancelled",
			during: func(_ *testing.T, h *harness) {
				h.advance(ShutdownSendGrace)
			},
			errHas: "context canceled",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			h.conn.mu.Lock()
			h.conn.sendStarted, h.conn.sendRelease = make(chan struct{}, 1), make(chan struct{})
			h.conn.mu.Unlock()
			replies := h.requestAsync(body)
			<-h.conn.sendStarted
			h.stop()
			testwait.For(t, 5*time.Second, "shutdown to begin", h.stopping)
			tt.during(t, h)
			if tt.wantOK {
				select {
				case r := <-replies:
					t.Fatalf("send answered before its end: %+v", r)
				default:
				}
				close(h.conn.sendRelease)
			}
			r := h.reply(replies)
			if r.OK != tt.wantOK || !strings.Contains(r.Error, tt.errHas) {
				t.Fatalf("reply = %+v, want ok=%v error containing %q", r, tt.wantOK, tt.errHas)
			}
			h.shutdown()
			if c := h.conn.get(func(f *fakeConn) int { return f.closes }); c != 1 {
				t.Fatalf("closes = %d", c)
			}
		})
	}
}

// Every gateway.send that reaches the gateway while it stops is answered
// (sent, "shutting down", or "no responders" once the subscription is
// gone), never left unanswered: relay would wait out its 2-minute request
// timeout, past its own stop budget.
func TestStoppingGatewayAnswersEverySendRoutedToIt(t *testing.T) {
	h := start(t)
	h.connected()
	var (
		wg         sync.WaitGroup
		mu         sync.Mutex
		unanswered int
		asked      int
	)
	done := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				_, err := h.nc.Request(h.subj.GatewaySend(), []byte(`{"to":"15551234567","text":"x"}`), 2*time.Second)
				mu.Lock()
				asked++
				if errors.Is(err, nats.ErrTimeout) {
					unanswered++
				}
				mu.Unlock()
			}
		})
	}
	testwait.For(t, 5*time.Second, "sends under way", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return asked > 50
	})
	h.shutdown()
	close(done)
	wg.Wait()
	if unanswered > 0 {
		t.Fatalf("%d of %d gateway.send requests were left unanswered while the gateway stopped", unanswered, asked)
	}
}
