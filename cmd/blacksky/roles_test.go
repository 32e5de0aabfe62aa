package main

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/logging"
)

// recorder is a runner that notes when it was asked to stop and when it did.
type recorder struct {
	name  string
	hang  chan struct{} // when set, Run ignores cancel until it is closed
	log   *stopLog
	ready chan struct{}
}

type stopLog struct {
	mu     sync.Mutex
	events []string
}

func (l *stopLog) add(s string) {
	l.mu.Lock()
	l.events = append(l.events, s)
	l.mu.Unlock()
}

func (l *stopLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.events, " ")
}

func (r *recorder) Run(ctx context.Context) error {
	close(r.ready)
	<-ctx.Done()
	r.log.add("stop:" + r.name)
	if r.hang != nil {
		<-r.hang // a socket that will not close
		return nil
	}
	r.log.add("stopped:" + r.name)
	return nil
}

func TestSupervisorStopsInReverseOrder(t *testing.T) {
	tests := []struct {
		name        string
		hangGateway bool
		want        string
		wantErr     string
	}{
		{"all stop", false, "stop:gateway stopped:gateway stop:backup stopped:backup stop:health stopped:health", ""},
		// A gateway that never closes its socket must not cost the
		// shutdown snapshot: backup is stopped after the gateway's share.
		{"gateway hangs", true, "stop:gateway stop:backup stopped:backup stop:health stopped:health", "gateway did not stop"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			log := &stopLog{}
			release := make(chan struct{})
			defer close(release)
			sup := newSupervisor(logging.Discard())
			for _, name := range []string{"health", "backup", "gateway"} {
				r := &recorder{name: name, log: log, ready: make(chan struct{})}
				if tt.hangGateway && name == "gateway" {
					r.hang = release
				}
				sup.start(name, r)
				<-r.ready
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			start := time.Now()
			err := sup.wait(ctx, 400*time.Millisecond)
			if got := log.String(); got != tt.want {
				t.Fatalf("stop sequence %q, want %q", got, tt.want)
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			if time.Since(start) > 5*time.Second {
				t.Fatal("shutdown overran its budget")
			}
		})
	}
}
