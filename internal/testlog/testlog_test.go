package testlog_test

import (
	"sync"
	"testing"

	"github.com/blacksky-md/blacksky/internal/testlog"
)

// Many goroutines log while the test reads; every line arrives whole.
func TestBufferTakesConcurrentWritersAndReaders(t *testing.T) {
	log, buf := testlog.New()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 50 {
				log.Info("tick", "writer", i)
				_ = buf.String()
			}
		})
	}
	wg.Wait()
	if n := buf.Count("msg=tick"); n != 400 {
		t.Fatalf("%d lines, want 400", n)
	}
	if n := len(buf.Lines("writer=7")); n != 50 {
		t.Fatalf("%d lines of writer 7, want 50", n)
	}
	if l := buf.Lines("level=INFO")[0]; l[len(l)-1] == '\n' {
		t.Fatalf("line %q keeps its newline", l)
	}
}
