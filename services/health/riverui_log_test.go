package health

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/blacksky-md/blacksky/internal/testdb"
	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
)

// cutProxy forwards TCP to target until cut, which drops every connection
// and refuses new ones until restore: a database outage without stopping
// the shared PostgreSQL.
type cutProxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]bool
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *cutProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[up] = true, true
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			dst.Close()
			src.Close()
		}
		p.wg.Go(func() { pipe(up, c) })
		p.wg.Go(func() { pipe(c, up) })
	}
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

func (p *cutProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}

// With the UI started, its query loop (River UI's query cachers, every
// ~10 s) and the API calls of a browser log one line when the database goes
// down and one when it is back; a request River UI merely refuses (a job
// that does not exist) is logged as it is and marks nothing down.
func TestRiverUIDatabaseOutageIsTwoLines(t *testing.T) {
	db := testdb.Postgres(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pool, err := pgxpool.New(ctx, db.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatal(err)
	}

	u, err := url.Parse(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutProxy(t, u.Host)
	u.Host = proxy.ln.Addr().String()
	q := u.Query()
	q.Set("connect_timeout", "2")
	u.RawQuery = q.Encode()

	logs := &testlog.Buffer{}
	ui, err := NewRiverUI(u.String(), 2, logs.Logger())
	if err != nil {
		t.Fatal(err)
	}
	defer ui.Close()
	// The loop's first tick comes 9-11 s after Start.
	if err := ui.Start(ctx); err != nil {
		t.Fatal(err)
	}
	get := func(path string) int {
		req := httptest.NewRequest(http.MethodGet, "/riverui/api/"+path, nil)
		ctx, cancel := context.WithTimeout(req.Context(), 10*time.Second)
		defer cancel()
		rec := httptest.NewRecorder()
		ui.ServeHTTP(rec, req.WithContext(ctx))
		return rec.Code
	}
	if code := get("jobs?state=available"); code != 200 {
		t.Fatalf("with the database up: %d", code)
	}
	if code := get("jobs/987654321"); code != 404 {
		t.Fatalf("a job that does not exist: %d, want 404", code)
	}
	if code := get("jobs?state=available"); code != 200 {
		t.Fatalf("with the database up: %d", code)
	}
	if !strings.Contains(logs.String(), "API error response") || strings.Contains(logs.String(), "answers again") ||
		strings.Contains(logs.String(), "not logged until") {
		t.Fatalf("a 404 is logged as it is and is no outage:\n%s", logs.String())
	}

	proxy.cut()
	testwait.For(t, 15*time.Second, "River UI's query loop to fail", func() bool {
		return strings.Contains(logs.String(), "Error running query")
	})
	for range 4 { // a browser polling
		if code := get("jobs?state=available"); code < 400 {
			t.Fatalf("with the database down: %d", code)
		}
	}
	down := append(logs.Lines("level=ERROR"), logs.Lines("level=WARN")...)
	if len(down) != 1 || !strings.Contains(down[0], "Error running query") ||
		!strings.Contains(down[0], "not logged until a database query succeeds again") {
		t.Fatalf("want one line, the loop's, saying repeats are held back:\n%s", logs.String())
	}
	if n := strings.Count(logs.String(), "API error response"); n != 1 {
		t.Fatalf("%d 'API error response' lines, want only the 404's:\n%s", n, logs.String())
	}

	proxy.restore()
	if code := get("jobs?state=available"); code != 200 {
		t.Fatalf("with the database back: %d", code)
	}
	var back []string
	for _, l := range logs.Lines("level=INFO") {
		if strings.Contains(l, "the database answers again") {
			back = append(back, l)
		}
	}
	if len(back) != 1 || !strings.Contains(back[0], "errors_not_logged=") || strings.Contains(back[0], "errors_not_logged=0") {
		t.Fatalf("want one line saying the database is back, counting what was held back:\n%s", logs.String())
	}
}
