package health

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/internal/testlog"
	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// signInFrom posts token to /signin as a client behind Heroku's router.
func signInFrom(t *testing.T, b *bundle, xff, token string) (int, *http.Response) {
	t.Helper()
	v := url.Values{"token": {token}}
	hdr := map[string]string{"Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-Proto": "https"}
	if xff != "" {
		hdr["X-Forwarded-For"] = xff
	}
	code, _, resp := do(t, http.MethodPost, b.url+"/signin", strings.NewReader(v.Encode()), hdr)
	return code, resp
}

// TestWrongTokensThrottledPerClient: one client's guesses do not throttle
// another, the client is the hop Heroku's router appended (a spoofed hop in
// front of it changes nothing), and wrong bearer tokens spend the same budget.
func TestWrongTokensThrottledPerClient(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.Heroku = true })
	const guesser, operator = "203.0.113.5", "198.51.100.7"
	for i := range guessBurst {
		// A client may send any X-Forwarded-For; the router appends the real one.
		xff := "10.0.0." + strconv.Itoa(i) + ", " + guesser
		if code, _ := signInFrom(t, b, xff, "guess"); code != 401 {
			t.Fatalf("guess %d = %d, want 401", i, code)
		}
	}
	if code, _ := signInFrom(t, b, "192.0.2.99, "+guesser, "guess"); code != http.StatusTooManyRequests {
		t.Fatalf("guess past the budget with a new spoofed hop = %d, want 429", code)
	}
	if code, _, _ := b.get(t, "/status", map[string]string{"Authorization": "Bearer guess", "X-Forwarded-For": guesser}); code != http.StatusTooManyRequests {
		t.Fatalf("wrong bearer on /status past the budget = %d, want 429", code)
	}
	if code, _, _ := b.get(t, "/pair/state", map[string]string{"Authorization": "Bearer guess", "X-Forwarded-For": guesser}); code != http.StatusTooManyRequests {
		t.Fatalf("wrong bearer on /pair/state past the budget = %d, want 429", code)
	}
	if code, _, _ := b.get(t, "/status", map[string]string{"Authorization": "Bearer " + testToken, "X-Forwarded-For": guesser}); code != 200 {
		t.Fatalf("right bearer from the throttled client = %d, want 200", code)
	}
	if code, resp := signInFrom(t, b, guesser, testToken); code != http.StatusSeeOther || len(resp.Cookies()) != 1 {
		t.Fatalf("right token from the throttled client = %d, want 303 with a cookie", code)
	}
	if code, _ := signInFrom(t, b, operator, "typo"); code != 401 {
		t.Fatalf("another client's first wrong token = %d, want 401", code)
	}
	if code, _ := signInFrom(t, b, operator, testToken); code != http.StatusSeeOther {
		t.Fatalf("another client's right token = %d, want 303", code)
	}
}

func TestGuesserTableBounded(t *testing.T) {
	t.Parallel()
	clock := clockwork.NewFakeClock()
	a := newAuth(testToken, true, false, clock.Now)
	req := func(addr string) *http.Request {
		t.Helper()
		r, err := http.NewRequest(http.MethodPost, "/signin", nil)
		if err != nil {
			t.Fatal(err)
		}
		r.RemoteAddr = addr
		return r
	}
	for i := range maxGuessers + 500 {
		ip := net.IPv4(10, byte(i>>16), byte(i>>8), byte(i)).String()
		a.wrong(req(net.JoinHostPort(ip, "1234")))
		if i%1000 == 0 {
			clock.Advance(time.Millisecond)
		}
	}
	if n := len(a.guessers); n > maxGuessers {
		t.Fatalf("%d clients remembered, want at most %d", n, maxGuessers)
	}
	// The newest client is still throttled: eviction took the idlest.
	n := maxGuessers + 499
	last := net.JoinHostPort(net.IPv4(10, byte(n>>16), byte(n>>8), byte(n)).String(), "1")
	for range guessBurst - 1 {
		a.wrong(req(last))
	}
	if a.wrong(req(last)) {
		t.Fatal("the newest client's budget was forgotten")
	}
	// Once budgets have refilled, the whole table can be dropped.
	clock.Advance(guessBurst * guessEvery)
	a.wrong(req("192.0.2.1:1"))
	for i := range maxGuessers {
		a.wrong(req(net.JoinHostPort(net.IPv4(172, 16, byte(i>>8), byte(i)).String(), "1")))
	}
	if n := len(a.guessers); n > maxGuessers {
		t.Fatalf("%d clients remembered, want at most %d", n, maxGuessers)
	}
	// IPv6 clients count by /64.
	if a.client(req("[2001:db8:1:2::1]:1")) != a.client(req("[2001:db8:1:2:ffff::9]:1")) {
		t.Fatal("two addresses of one /64 count as different clients")
	}
}

// TestNewDoesNotWaitForTheBus: with NATS down, New returns at once and
// /healthz answers (it used to wait 10 s for a flush).
func TestNewDoesNotWaitForTheBus(t *testing.T) {
	t.Parallel()
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	natsURL := "nats://" + dead.Addr().String()
	dead.Close()
	nc, err := bus.Connect(natsURL, "", "health", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	svc, err := New(Options{NC: nc, Listener: ln, Session: "S", Instance: "web.1", Log: logging.Discard(), Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatalf("/healthz with NATS down: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/healthz with NATS down = %d", resp.StatusCode)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("/healthz answered %s after New with NATS down, want at once", d)
	}
}

// TestHerokuSendsPlainHTTPToHTTPS: on Heroku the private pages and sign-in
// redirect plain http (as the router reports it) to https before any token
// is read, and the cookie is always Secure.
func TestHerokuSendsPlainHTTPToHTTPS(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.Heroku = true; o.PublicURL = "https://my-bot.herokuapp.com" })
	plain := func(method, path string, hdr map[string]string) (int, *http.Response) {
		t.Helper()
		var body *strings.Reader
		if method == http.MethodPost {
			body = strings.NewReader(url.Values{"token": {testToken}}.Encode())
		} else {
			body = strings.NewReader("")
		}
		req, err := http.NewRequest(method, b.url+path, body)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "evil.example"
		req.Header.Set("X-Forwarded-Proto", "http")
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp
	}
	for _, tt := range []struct{ method, path string }{
		{http.MethodGet, "/pair"},
		{http.MethodGet, "/pair/state?x=1"},
		{http.MethodGet, "/pair/qr.png"},
		{http.MethodGet, "/status"},
		{http.MethodGet, "/riverui/jobs"},
		{http.MethodPost, "/signin"},
		{http.MethodPost, "/signout"},
	} {
		code, resp := plain(tt.method, tt.path, bearer(testToken))
		if want := "https://my-bot.herokuapp.com" + tt.path; code != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
			t.Errorf("%s %s over http = %d to %q, want 308 to %q", tt.method, tt.path, code, resp.Header.Get("Location"), want)
		}
		if len(resp.Cookies()) != 0 {
			t.Errorf("%s %s over http set a cookie", tt.method, tt.path)
		}
	}
	if code, _ := plain(http.MethodGet, "/healthz", nil); code != 200 {
		t.Errorf("/healthz over http = %d, want 200 (monitors and keep-awake)", code)
	}
	if code, _ := plain(http.MethodGet, "/readyz", nil); code != 503 && code != 200 {
		t.Errorf("/readyz over http = %d, want an answer, not a redirect", code)
	}

	// Over https, and even when the router header is missing, the cookie is Secure.
	for _, proto := range []string{"https", ""} {
		hdr := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
		if proto != "" {
			hdr["X-Forwarded-Proto"] = proto
		}
		code, _, resp := do(t, http.MethodPost, b.url+"/signin", strings.NewReader(url.Values{"token": {testToken}}.Encode()), hdr)
		cs := resp.Cookies()
		if code != http.StatusSeeOther || len(cs) != 1 || !cs[0].Secure {
			t.Errorf("sign-in on Heroku (proto %q) = %d, cookies %v; want 303 and a Secure cookie", proto, code, cs)
		}
	}
}

// TestNotHerokuIgnoresForwardedProto: off Heroku nothing vouches for
// X-Forwarded-Proto, so it redirects nothing.
func TestNotHerokuIgnoresForwardedProto(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	code, _, resp := b.get(t, "/pair", map[string]string{"X-Forwarded-Proto": "http"})
	if code != 401 || resp.Header.Get("Location") != "" {
		t.Fatalf("GET /pair with X-Forwarded-Proto: http off Heroku = %d (Location %q), want 401", code, resp.Header.Get("Location"))
	}
}

// TestQRVersionSurvivesRestart: the pair page swaps its image when the
// version changes; a restarted tracker must not reuse the old one's numbers
// for a different code.
func TestQRVersionSurvivesRestart(t *testing.T) {
	t.Parallel()
	clock := clockwork.NewFakeClock()
	qr := func(tr *Tracker, code string) int64 {
		t.Helper()
		tr.HandleConn(bus.ConnQR, []byte(mustJSON(t, bus.ConnEvent{Event: bus.Event{At: clock.Now()}, Kind: bus.ConnQR, Code: code})))
		return tr.WhatsApp().QRVersion
	}
	before := NewTracker(clock, 0, logging.Discard())
	v1 := qr(before, "2@old-code,a,b,c")
	after := NewTracker(clock, 0, logging.Discard()) // health restarted
	v2 := qr(after, "2@new-code,a,b,c")
	if v1 == 0 || v2 == 0 || v1 == v2 {
		t.Fatalf("versions across a restart: %d then %d; want two different non-zero ones", v1, v2)
	}
	if v := qr(after, "2@old-code,a,b,c"); v != v1 {
		t.Fatalf("the same code got version %d after a restart, %d before", v, v1)
	}
	if v := qr(after, "2@third-code,a,b,c"); v == v1 || v == v2 {
		t.Fatalf("a rotated code kept version %d", v)
	}
	const maxSafeJS = 1<<53 - 1
	if v1 > maxSafeJS || v2 > maxSafeJS || v1 < 0 || v2 < 0 {
		t.Fatalf("versions %d, %d do not fit a JavaScript number", v1, v2)
	}
}

// TestKeepAwakeLogsRedacted: credentials in HEROKU_APP_URL never reach the
// log, neither when keep-awake starts nor when a ping fails.
func TestKeepAwakeLogsRedacted(t *testing.T) {
	t.Parallel()
	const secret = "s3cr3t-in-the-url"
	var logs testlog.Buffer
	failing := &http.Client{Transport: roundTripFunc(func(*http.Request) (*http.Response, error) {
		return nil, errors.New("router unreachable")
	})}
	b := setup(t, func(o *Options) {
		o.Log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		o.KeepAwakeURL = "https://" + secret + "@my-bot.herokuapp.com"
		o.KeepAwakeInterval = time.Minute
		o.HTTPClient = failing
	})
	testwait.For(t, 10*time.Second, "a failed keep-awake ping in the log", func() bool {
		b.clock.Advance(time.Minute) // the keep-awake ticker may start after the first advance
		return strings.Contains(logs.String(), "keep-awake ping failed")
	})
	out := logs.String()
	if !strings.Contains(out, "keep-awake on") || !strings.Contains(out, "my-bot.herokuapp.com") {
		t.Fatalf("keep-awake start not logged:\n%s", out)
	}
	if strings.Contains(out, secret) {
		t.Fatalf("the keep-awake URL's credentials reached the log:\n%s", out)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
