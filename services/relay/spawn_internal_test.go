package relay

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nats-io/nats.go"
)

func newBareService(t *testing.T) *Service {
	t.Helper()
	s, err := New(Options{NC: &nats.Conn{}, Config: Config{Session: "t"},
		Open: func(context.Context) (Store, error) { return nil, errors.New("no database in this test") }})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A NATS callback can still be running when relay unsubscribes and stops:
// a request it hands over after stop began is refused, never run against a
// database being closed.
func TestRequestArrivingAfterStopIsRefusedNotRun(t *testing.T) {
	s := newBareService(t)
	if err := s.stop(nil); err != nil {
		t.Fatal(err)
	}
	var ran, refused atomic.Int32
	h := s.spawn(func(*nats.Msg) { ran.Add(1) }, func(*nats.Msg) { refused.Add(1) })
	h(&nats.Msg{Subject: "x"})
	if ran.Load() != 0 || refused.Load() != 1 {
		t.Fatalf("after stop: ran %d, refused %d; want refused", ran.Load(), refused.Load())
	}
}

// Requests racing stop either run before stop returns or are refused; run
// with -race, a WaitGroup Add racing Wait is reported too.
func TestRequestsRacingStopRunBeforeItEndsOrAreRefused(t *testing.T) {
	for range 50 {
		s := newBareService(t)
		var stopped, late, refused atomic.Int32
		h := s.spawn(func(*nats.Msg) {
			if stopped.Load() != 0 {
				late.Add(1)
			}
		}, func(*nats.Msg) { refused.Add(1) })
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range 8 {
			wg.Go(func() {
				<-start
				for range 50 {
					h(&nats.Msg{Subject: "x"})
				}
			})
		}
		close(start)
		if err := s.stop(nil); err != nil {
			t.Fatal(err)
		}
		stopped.Store(1)
		wg.Wait()
		if late.Load() != 0 {
			t.Fatalf("%d handlers ran after stop returned", late.Load())
		}
	}
}
