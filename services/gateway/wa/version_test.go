package wa

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// versionPage stands in for https://web.whatsapp.com, the page
// whatsmeow.GetLatestVersion reads the client revision from. The returned
// client sends every request to it, whatever host the URL names.
func versionPage(t *testing.T, revision int) (*http.Client, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.Method != http.MethodGet || r.URL.Path != "/" || r.Host != "web.whatsapp.com" || r.Header.Get("User-Agent") == "" {
			t.Errorf("version page asked %s %s%s (User-Agent %q)", r.Method, r.Host, r.URL.Path, r.Header.Get("User-Agent"))
		}
		fmt.Fprintf(w, `<html><script>self.__swData={"dynamic_data":{"SiteData":{"server_revision":1,"client_revision":%d,"push_phase":"C3"}}}</script></html>`, revision)
	}))
	t.Cleanup(srv.Close)
	base := srv.Client()
	t.Cleanup(base.CloseIdleConnections)
	addr := srv.Listener.Addr().String()
	return &http.Client{Transport: rewriteHost{to: addr, next: base.Transport}, Timeout: 10 * time.Second}, &hits
}

// rewriteHost sends a request for any host to the test server at to.
type rewriteHost struct {
	to   string
	next http.RoundTripper
}

func (rw rewriteHost) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Host = r.URL.Host // what the page sees: the host whatsmeow asked for
	r.URL.Host = rw.to
	return rw.next.RoundTrip(r)
}

// keepVersion restores whatsmeow's process-wide version after a test.
func keepVersion(t *testing.T) {
	orig := store.GetWAVersion()
	t.Cleanup(func() { store.SetWAVersion(orig) })
}

func TestWebVersionFetchesAndApplies(t *testing.T) {
	keepVersion(t)
	client, hits := versionPage(t, 1031234567)
	v := WebVersion{HTTP: client}
	latest, err := v.Latest(context.Background())
	if err != nil || latest != "2.3000.1031234567" {
		t.Fatalf("Latest = %q, %v", latest, err)
	}
	if hits.Load() != 1 {
		t.Fatalf("version page asked %d times", hits.Load())
	}
	if err := v.Use(latest); err != nil {
		t.Fatal(err)
	}
	if got := v.Current(); got != latest || store.GetWAVersion().String() != latest {
		t.Fatalf("Current = %q, whatsmeow presents %s; want %s", got, store.GetWAVersion(), latest)
	}
	for _, bad := range []string{"", "2.3000", "2.x.1", "0.0.0", "2.3000.99999999999"} {
		if err := v.Use(bad); err == nil {
			t.Errorf("Use(%q) accepted", bad)
		}
	}
	if v.Current() != latest {
		t.Fatalf("a refused version changed the one presented: %s", v.Current())
	}
}

// The real client and the real version fetch behind the gateway: on
// client_outdated the gateway reads WhatsApp's current version from the
// page, whatsmeow presents it from then on, and the gateway reconnects.
func TestClientOutdatedFetchesTheVersionPage(t *testing.T) {
	keepVersion(t)
	client, hits := versionPage(t, 1039999999)
	path := filepath.Join(t.TempDir(), "session.db")
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	gwNC, err := srv.Connect("gateway", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer gwNC.Close()
	nc, err := srv.Connect("test", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	subj := bus.NewSubjects("IT-Session")
	var mu sync.Mutex
	var kinds []string
	sub, err := nc.Subscribe(subj.ConnAll(), func(m *nats.Msg) {
		var e bus.ConnEvent
		_ = json.Unmarshal(m.Data, &e)
		mu.Lock()
		kinds = append(kinds, e.Kind)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	seen := func(kind string) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, k := range kinds {
			if k == kind {
				n++
			}
		}
		return n
	}

	opened := make(chan *Client, 1)
	g := gateway.New(gateway.Config{
		Session: "IT-Session", Instance: "it",
		// One dial, then a long wait: the test sends client_outdated in it.
		ReconnectMin: time.Hour, ReconnectMax: time.Hour,
	}, gateway.Deps{
		NC: gwNC,
		Open: func(ctx context.Context) (gateway.Conn, error) {
			c, err := Open(ctx, Options{Path: path, Log: discard()})
			if err == nil {
				opened <- c
			}
			return c, err
		},
		Log:      discard(),
		Versions: WebVersion{HTTP: client},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	c := <-opened
	testwait.For(t, 30*time.Second, "the first failed dial", func() bool { return seen(bus.ConnReconnecting) == 1 })

	before := store.GetWAVersion().String()
	c.dispatch(&events.ClientOutdated{}) // as whatsmeow reports WhatsApp's 405
	testwait.For(t, 30*time.Second, "a reconnect with the fetched version", func() bool {
		return seen(bus.ConnClientOutdated) == 1 && seen(bus.ConnConnecting) == 2
	})
	if got := store.GetWAVersion().String(); got != "2.3000.1039999999" || got == before {
		t.Fatalf("whatsmeow presents %s (was %s), want 2.3000.1039999999", got, before)
	}
	if hits.Load() != 1 {
		t.Fatalf("version page asked %d times, want 1", hits.Load())
	}
}
