package health

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
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

// lockedBuf is a log written by several goroutines.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines are the log lines at level (text handler's level=...) so far.
func (l *lockedBuf) lines(level string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range strings.Split(l.b.String(), "\n") {
		if strings.Contains(line, "level="+level) {
			out = append(out, line)
		}
	}
	return out
}

func TestRiverUIDatabaseOutageIsTwoLines(t *testing.T) {
	db := testdb.Postgres(t)
	ctx := context.Background()
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

	logs := &lockedBuf{}
	ui, err := NewRiverUI(u.String(), 2, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer ui.Close()
	get := func() int {
		req := httptest.NewRequest(http.MethodGet, "/riverui/api/jobs?state=available", nil)
		ctx, cancel := context.WithTimeout(req.Context(), 10*time.Second)
		defer cancel()
		rec := httptest.NewRecorder()
		ui.ServeHTTP(rec, req.WithContext(ctx))
		return rec.Code
	}
	if code := get(); code != 200 {
		t.Fatalf("with the database up: %d", code)
	}

	for round := 1; round <= 2; round++ {
		proxy.cut()
		for range 6 { // a browser polling, River UI's loop ticking
			if code := get(); code < 400 {
				t.Fatalf("round %d: with the database down: %d", round, code)
			}
		}
		errs := append(logs.lines("ERROR"), logs.lines("WARN")...)
		if len(errs) != round {
			t.Fatalf("round %d: %d error lines for %d outages, want one each:\n%s", round, len(errs), round, strings.Join(errs, "\n"))
		}
		// River UI's per-request line (at info, carrying the error) once
		// per outage too.
		if n := strings.Count(logs.String(), "API error response"); n > round {
			t.Fatalf("round %d: %d 'API error response' lines, want at most one per outage:\n%s", round, n, logs.String())
		}
		if !strings.Contains(errs[round-1], "not logged until a database query succeeds again") {
			t.Fatalf("the first error should say repeats are held back: %s", errs[round-1])
		}
		proxy.restore()
		if code := get(); code != 200 {
			t.Fatalf("round %d: with the database back: %d", round, code)
		}
		back := 0
		for _, l := range logs.lines("INFO") {
			if strings.Contains(l, "the database answers again") {
				back++
				if !strings.Contains(l, "errors_not_logged=") || strings.Contains(l, "errors_not_logged=0") {
					t.Errorf("the line saying it is back should count what was held back: %s", l)
				}
			}
		}
		if back != round {
			t.Fatalf("round %d: %d lines saying the database is back, want %d:\n%s", round, back, round, logs.String())
		}
	}
}

func TestOutageHandlerKeepsOtherLines(t *testing.T) {
	logs := &lockedBuf{}
	o := newOutage(slog.New(slog.NewTextHandler(logs, nil)))
	log := o.logger().With("service", "riverui")
	log.Info("request", "n", 1)
	log.Info("request", "n", 2)
	log.Info("API error response", "internal_error", "conn closed")
	log.Info("API error response", "internal_error", "conn closed")
	log.Error("query failed", "err", errors.New("dial tcp: connection refused"))
	log.Error("query failed", "err", errors.New("dial tcp: connection refused"))
	log.Warn("another problem")
	log.Warn("another problem")
	o.ok()
	o.ok()
	log.Error("query failed")
	if got := len(logs.lines("INFO")); got != 4 {
		t.Errorf("%d info lines, want the 2 requests, one API error and one 'answers again':\n%s", got, logs.b.String())
	}
	if got := len(logs.lines("ERROR")); got != 2 {
		t.Errorf("%d error lines, want one per outage:\n%s", got, logs.b.String())
	}
	if got := len(logs.lines("WARN")); got != 1 {
		t.Errorf("%d warn lines, want one:\n%s", got, logs.b.String())
	}
	if !strings.Contains(logs.b.String(), "service=riverui") {
		t.Errorf("attributes lost: %s", logs.b.String())
	}
}
