package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// SIGTERM while relay waits on a webhook receiver that does not answer:
// the process still exits 0 within SHUTDOWN_TIMEOUT, and the message is
// delivered, with the same delivery id, once the process is back.
func TestSIGTERMDuringAHangingWebhookExitsCleanlyAndDeliversAfterTheRestart(t *testing.T) {
	t.Parallel()
	var (
		mu       sync.Mutex
		hang     = true
		requests []string // X-Blacksky-Delivery of every msg.in request
		accepted = map[string]string{}
	)
	hanging := make(chan struct{}, 1)
	closing := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		if req.Header.Get("X-Blacksky-Event") != "msg.in" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		var msg bus.MsgIn
		_ = json.Unmarshal(body, &msg)
		delivery := req.Header.Get("X-Blacksky-Delivery")
		mu.Lock()
		requests = append(requests, delivery)
		h := hang
		hang = false
		if !h {
			accepted[msg.ID] = delivery
		}
		mu.Unlock()
		if h {
			hanging <- struct{}{}
			select { // until relay hangs up
			case <-req.Context().Done():
			case <-closing:
			}
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(func() { close(closing); srv.Close() })

	db := testdb.Postgres(t)
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), db.URL).with("SESSION_ID", "E2E-Stop", "WEBHOOK_URL", srv.URL+"/hook",
		"WEBHOOK_SECRET", randomHex(t, 16), "SHUTDOWN_TIMEOUT", "25s")
	run(t, bin, e, "migrate")
	p := start(t, bin, "run (hanging webhook)", e, "run")
	w := watchSandbox(t, e, p)
	w.link()
	ids := w.inject(bus.SandboxInjectRequest{From: "4915100000077", Text: "sent while the receiver hangs"})
	select {
	case <-hanging:
	case <-time.After(60 * time.Second):
		t.Fatal("no msg.in request reached the webhook")
	}
	took := p.stop(t, 30*time.Second) // fails unless the exit is 0
	t.Logf("stopped %s after SIGTERM with a webhook request hanging", took.Round(time.Millisecond))

	p2 := start(t, bin, "run (after the hanging webhook)", e, "run")
	watchSandbox(t, e, p2)
	waitFor(t, 60*time.Second, "the message delivered after the restart", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return accepted[ids[0]] != ""
	})
	mu.Lock()
	if len(requests) < 2 || requests[0] != accepted[ids[0]] {
		t.Errorf("delivery ids %v, accepted %q: want the cancelled delivery's id again", requests, accepted[ids[0]])
	}
	mu.Unlock()
	p2.stop(t, 30*time.Second)
	checkLogs(t, []string{e["NATS_TOKEN"], e["HEALTH_TOKEN"], e["SESSION_ENCRYPTION_KEY"], e["WEBHOOK_SECRET"]}, p, p2)
}
