package health

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

func TestHealthz(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	code, body, resp := b.get(t, "/healthz", nil)
	if code != http.StatusOK || body != "ok\n" {
		t.Fatalf("GET /healthz = %d %q, want 200 ok", code, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("Content-Type = %q", ct)
	}
	// HEAD works too (load balancers use it).
	if code, _, _ := do(t, http.MethodHead, b.url+"/healthz", nil, nil); code != http.StatusOK {
		t.Errorf("HEAD /healthz = %d", code)
	}
}

func TestReadyz(t *testing.T) {
	t.Parallel()
	gw := func(state string) bus.GatewayDetails { return bus.GatewayDetails{WAState: state} }
	tests := []struct {
		name        string
		mod         func(*Options)
		act         func(t *testing.T, b *bundle)
		wantCode    int
		wantReasons []string // prefixes
	}{
		{
			name:     "nothing heard yet",
			act:      func(*testing.T, *bundle) {},
			wantCode: 503,
			wantReasons: []string{"gateway: no heartbeat yet", "backup: no heartbeat yet",
				"whatsapp: state unknown"},
		},
		{
			name:     "connected and backup ok",
			act:      func(t *testing.T, b *bundle) { b.healthy(t) },
			wantCode: 200,
		},
		{
			name: "pairing counts as ready",
			act: func(t *testing.T, b *bundle) {
				b.beat(t, "gateway", "web.1", bus.StatePairing, gw(bus.StatePairing))
				b.beat(t, "backup", "web.1", bus.StateOK, nil)
			},
			wantCode: 200,
		},
		{
			name: "reconnecting is not ready",
			act: func(t *testing.T, b *bundle) {
				b.healthy(t)
				b.conn(t, bus.ConnEvent{Kind: bus.ConnReconnecting, Attempt: 2, DelayMS: 2000})
			},
			wantCode:    503,
			wantReasons: []string{"whatsapp: reconnecting"},
		},
		{
			name: "degraded backup is still ready",
			act: func(t *testing.T, b *bundle) {
				b.healthy(t)
				b.beat(t, "backup", "web.1", bus.StateDegraded, bus.BackupDetails{Database: "postgres"})
			},
			wantCode: 200,
		},
		{
			name: "backup disabled: no backup heartbeat needed",
			mod:  func(o *Options) { o.BackupEnabled = false },
			act: func(t *testing.T, b *bundle) {
				b.beat(t, "gateway", "web.1", bus.StateConnected, gw(bus.StateConnected))
				b.relayBeat(t, relayOK())
			},
			wantCode: 200,
		},
		{
			name:     "health check disabled: unknown state is ready",
			mod:      func(o *Options) { o.HealthCheck = false },
			act:      func(*testing.T, *bundle) {},
			wantCode: 200,
		},
		{
			name: "health check disabled: a known bad state is not",
			mod:  func(o *Options) { o.HealthCheck = false },
			act: func(t *testing.T, b *bundle) {
				b.conn(t, bus.ConnEvent{Kind: bus.ConnLoggedOut, Reason: "401"})
			},
			wantCode:    503,
			wantReasons: []string{"whatsapp: logged_out"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, tt.mod)
			tt.act(t, b)
			code, body, _ := b.get(t, "/readyz", nil)
			doc := decode[readyDoc](t, body)
			if code != tt.wantCode || doc.Ready != (tt.wantCode == 200) {
				t.Fatalf("GET /readyz = %d %s, want %d", code, body, tt.wantCode)
			}
			for _, want := range tt.wantReasons {
				if !hasReason(doc.Reasons, want) {
					t.Errorf("reasons %q lack %q", doc.Reasons, want)
				}
			}
			if tt.wantCode == 200 && len(doc.Reasons) != 0 {
				t.Errorf("ready with reasons %q", doc.Reasons)
			}
		})
	}
}

func TestReadyzStaleHeartbeat(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("fresh: %d %s", code, body)
	}

	// Two intervals and a bit: still fresh (the limit is three).
	b.advance(t, 2*bus.HeartbeatInterval+time.Second)
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("11 s old: %d %s, want 200", code, body)
	}
	// Past three intervals: the gateway and backup stopped beating.
	b.advance(t, bus.HeartbeatInterval)
	code, body, _ := b.get(t, "/readyz", nil)
	doc := decode[readyDoc](t, body)
	if code != 503 || !hasReason(doc.Reasons, "gateway: heartbeat stale") || !hasReason(doc.Reasons, "backup: heartbeat stale") ||
		!hasReason(doc.Reasons, "relay not running: incoming messages are not acknowledged until it is back (heartbeat stale") {
		t.Fatalf("16 s old: %d %s, want 503 with stale reasons", code, body)
	}
	if hasReason(doc.Reasons, "health:") {
		t.Errorf("health's own heartbeat should be fresh (its ticker beat): %q", doc.Reasons)
	}
	_, st, _ := b.get(t, "/status", bearer(testToken))
	sd := decode[StatusDoc](t, st)
	if g := sd.Services["gateway"]; g.State != "stale" || g.Fresh || g.AgeMS == nil || *g.AgeMS != 16000 {
		t.Errorf("status gateway = %+v, want stale, 16000 ms", g)
	}
	_, metrics, _ := b.get(t, "/metrics", nil)
	for _, want := range []string{`blacksky_service_up{service="gateway"} 0`, `blacksky_heartbeat_age_seconds{service="gateway"} 16`, `blacksky_ready 0`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// They come back.
	b.healthy(t)
	if code, body, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Fatalf("after new beats: %d %s", code, body)
	}
}

func TestStandbyGatewayDoesNotHideTheActiveOne(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	b.beat(t, "gateway", "web.2", bus.StateStandby, bus.GatewayDetails{WAState: bus.StateStandby})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnStandby})
	_, body, _ := b.get(t, "/status", bearer(testToken))
	sd := decode[StatusDoc](t, body)
	if sd.WhatsApp.State != bus.StateConnected || sd.Services["gateway"].Instance != "web.1" || sd.Services["gateway"].Instances != 2 {
		t.Fatalf("status = %+v / %+v, want the connected web.1 of 2 instances", sd.WhatsApp, sd.Services["gateway"])
	}
	if code, _, _ := b.get(t, "/readyz", nil); code != 200 {
		t.Errorf("readyz = %d with a standby beside a connected gateway", code)
	}
}

func TestStatusAccess(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	b.send(t, b.subj.BackupFailed(), "backup", bus.BackupFailed{Event: b.event(), Reason: "scheduled", Error: "database unreachable", Attempt: 1})
	at := b.clock.Now().Add(-time.Minute).UTC()
	b.send(t, b.subj.BackupDone(), "backup", bus.BackupDone{Event: bus.Event{At: at}, SnapshotID: 42, Reason: "scheduled",
		Bytes: 123456, StoredBytes: 65432, DurationMS: 321})
	signedIn := map[string]string{"Cookie": cookieName + "=" + b.svc.auth.issue()}

	tests := []struct {
		name     string
		path     string
		hdr      map[string]string
		wantCode int
		wantFull bool
	}{
		{"no token: public", "/status", nil, 200, false},
		{"bearer token: full", "/status", bearer(testToken), 200, true},
		{"bearer lower-case scheme", "/status", map[string]string{"Authorization": "bearer " + testToken}, 200, true},
		{"wrong bearer: 401", "/status", bearer("nope"), 401, false},
		{"basic auth is not a token", "/status", map[string]string{"Authorization": "Basic " + testToken}, 401, false},
		{"sign-in cookie: full", "/status", signedIn, 200, true},
		{"wrong cookie: 401", "/status", map[string]string{"Cookie": cookieName + "=abc"}, 401, false},
		{"the token itself as cookie is not accepted", "/status", map[string]string{"Cookie": cookieName + "=" + testToken}, 401, false},
		{"token in the URL is ignored", "/status?token=" + url.QueryEscape(testToken) + "&access_token=" + url.QueryEscape(testToken), nil, 200, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body, _ := b.get(t, tt.path, tt.hdr)
			if code != tt.wantCode {
				t.Fatalf("GET %s = %d %s, want %d", tt.path, code, body, tt.wantCode)
			}
			if code != 200 {
				if strings.Contains(body, "1555") || strings.Contains(body, "connected") {
					t.Errorf("401 body shows status: %s", body)
				}
				return
			}
			sd := decode[StatusDoc](t, body)
			if sd.Session != "BLACKSKY-MD" || sd.Version != "v-test" || !sd.Ready || sd.State != "ok" {
				t.Errorf("status header = %+v", sd)
			}
			if sd.WhatsApp.State != bus.StateConnected || sd.Services["gateway"].State != bus.StateConnected ||
				sd.Services["backup"].State != bus.StateOK || sd.Backup.State != bus.StateOK {
				t.Errorf("states = %+v %+v", sd.WhatsApp, sd.Services)
			}
			if !tt.wantFull {
				if sd.Detail != "public" || strings.Contains(body, "1555") || strings.Contains(body, "database unreachable") ||
					strings.Contains(body, "web.1") || sd.Memory != nil || sd.Backup.LastSnapshot != nil ||
					strings.Contains(body, "keepalive") || strings.Contains(body, "age_ms") {
					t.Errorf("public status shows details: %s", body)
				}
				return
			}
			if sd.Detail != "full" {
				t.Errorf("detail = %q", sd.Detail)
			}
			wa := sd.WhatsApp
			if wa.JID != "1555****567" || wa.ConnectedSince == nil || wa.Reconnects == nil || *wa.Reconnects != 3 ||
				wa.LastDisconnect != "keepalive timeout" {
				t.Errorf("whatsapp = %+v", wa)
			}
			if strings.Contains(body, "15551234567") {
				t.Errorf("full JID in status: %s", body)
			}
			snap := sd.Backup.LastSnapshot
			if snap == nil || snap.ID != 42 || snap.Bytes != 123456 || snap.At == nil || !snap.At.Equal(at) || snap.Reason != "scheduled" {
				t.Errorf("last snapshot = %+v", snap)
			}
			if sd.Backup.LastError != "database unreachable" || sd.Backup.LastErrorAt == nil {
				t.Errorf("backup error = %q", sd.Backup.LastError)
			}
			if g := sd.Services["gateway"]; g.AgeMS == nil || g.Instance != "web.1" || !g.Required {
				t.Errorf("gateway = %+v", g)
			}
			if sd.Memory == nil || sd.Memory.HeapInUseBytes == 0 || sd.Memory.TotalBytes < sd.Memory.HeapInUseBytes {
				t.Errorf("memory = %+v", sd.Memory)
			}
		})
	}
}

func TestStatusOpenInDevelopment(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.Token = "" })
	b.healthy(t)
	_, body, _ := b.get(t, "/status", nil)
	sd := decode[StatusDoc](t, body)
	if sd.Detail != "full" || sd.WhatsApp.JID != "1555****567" || !strings.Contains(sd.Auth, "no HEALTH_TOKEN") {
		t.Fatalf("development status without token = %s", body)
	}
	code, page, _ := b.get(t, "/pair", nil)
	if code != 200 || !strings.Contains(page, "No HEALTH_TOKEN is set") {
		t.Fatalf("GET /pair = %d, want 200 with a warning: %s", code, page)
	}
}

func TestProductionWithoutTokenForbids(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.Token = ""; o.Production = true })
	b.healthy(t)
	for _, path := range []string{"/pair", "/pair/state", "/pair/qr.png", "/riverui/", "/riverui/api/jobs"} {
		code, body, _ := b.get(t, path, bearer("anything"))
		if code != http.StatusForbidden || !strings.Contains(body, "HEALTH_TOKEN") {
			t.Errorf("GET %s = %d %q, want 403 naming HEALTH_TOKEN", path, code, body)
		}
	}
	code, body, _ := do(t, http.MethodPost, b.url+"/signin", strings.NewReader("token=x&next=/pair"),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	if code != http.StatusForbidden {
		t.Errorf("POST /signin = %d %s, want 403", code, body)
	}
	code, body, _ = b.get(t, "/status", nil)
	if sd := decode[StatusDoc](t, body); code != 200 || sd.Detail != "public" || sd.WhatsApp.JID != "" {
		t.Errorf("GET /status = %d %s, want public", code, body)
	}
}

func TestPairAccessAndSignIn(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)

	code, body, resp := b.get(t, "/pair", nil)
	if code != 401 || !strings.Contains(body, `action="/signin"`) || !strings.Contains(body, `name="token"`) {
		t.Fatalf("GET /pair without token = %d, want 401 with the sign-in form: %s", code, body)
	}
	if resp.Header.Get("Content-Security-Policy") == "" {
		t.Error("no CSP on the sign-in page")
	}
	if code, body, _ := b.get(t, "/pair", bearer("wrong")); code != 401 || !strings.Contains(body, "not right") {
		t.Errorf("GET /pair wrong token = %d", code)
	}
	if code, _, _ := b.get(t, "/pair/state", nil); code != 401 {
		t.Errorf("GET /pair/state without token = %d", code)
	}
	if code, _, _ := b.get(t, "/pair", bearer(testToken)); code != 200 {
		t.Errorf("GET /pair with token = %d", code)
	}

	form := func(tok, next string, hdr map[string]string) (int, string, *http.Response) {
		h := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
		for k, v := range hdr {
			h[k] = v
		}
		v := url.Values{"token": {tok}, "next": {next}}
		return do(t, http.MethodPost, b.url+"/signin", strings.NewReader(v.Encode()), h)
	}
	if code, body, resp := form("wrong", "/pair", nil); code != 401 || !strings.Contains(body, "not right") || len(resp.Cookies()) != 0 {
		t.Errorf("sign-in with a wrong token = %d, cookies %v", code, resp.Cookies())
	}
	code, _, resp = form(testToken, "https://evil.example/", nil)
	if code != http.StatusSeeOther || resp.Header.Get("Location") != "/pair" {
		t.Fatalf("sign-in = %d to %q, want 303 to /pair (never off-site)", code, resp.Header.Get("Location"))
	}
	cookies := resp.Cookies()
	if len(cookies) != 1 {
		t.Fatalf("cookies = %v", cookies)
	}
	c := cookies[0]
	if c.Name != cookieName || !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Secure || c.Value == testToken ||
		strings.Contains(c.Value, testToken) {
		t.Errorf("cookie = %+v", c)
	}
	_, _, resp = form(testToken, "/riverui/", map[string]string{"X-Forwarded-Proto": "https"})
	if cs := resp.Cookies(); len(cs) != 1 || !cs[0].Secure || resp.Header.Get("Location") != "/riverui/" {
		t.Errorf("sign-in behind https: cookies %v, location %q", cs, resp.Header.Get("Location"))
	}
	if code, _, _ := b.get(t, "/pair", map[string]string{"Cookie": c.String()}); code != 200 {
		t.Errorf("GET /pair with the cookie = %d", code)
	}
	_, page, _ := b.get(t, "/pair", map[string]string{"Cookie": c.String()})
	_, _, resp = do(t, http.MethodPost, b.url+"/signout", strings.NewReader(url.Values{"csrf": {csrfOf(t, page)}}.Encode()),
		map[string]string{"Cookie": c.String(), "Content-Type": "application/x-www-form-urlencoded"})
	if cs := resp.Cookies(); len(cs) != 1 || cs[0].MaxAge >= 0 {
		t.Errorf("sign-out cookies = %v", cs)
	}
}

func TestSignInThrottlesGuessing(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	post := func(tok string) int {
		v := url.Values{"token": {tok}}
		code, _, _ := do(t, http.MethodPost, b.url+"/signin", strings.NewReader(v.Encode()),
			map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
		return code
	}
	for i := range guessBurst {
		if code := post("guess"); code != 401 {
			t.Fatalf("guess %d = %d, want 401", i, code)
		}
	}
	if code := post("guess"); code != http.StatusTooManyRequests {
		t.Fatalf("11th guess = %d, want 429", code)
	}
	// A guesser must not lock the operator out: the right token signs in
	// even while wrong ones are refused.
	if code := post(testToken); code != http.StatusSeeOther {
		t.Fatalf("right token while guesses are throttled = %d, want 303", code)
	}
	if code := post("guess"); code != http.StatusTooManyRequests {
		t.Fatalf("guess after the right token = %d, want 429 (the budget is not reset)", code)
	}
	b.clock.Advance(2 * guessEvery) // the budget refills on the injected clock
	if code := post("guess"); code != 401 {
		t.Fatalf("guess after the pause = %d, want 401", code)
	}
}

func TestPairStateModes(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.PairPhone = "15557654321" })
	state := func() PairDoc {
		t.Helper()
		code, body, _ := b.get(t, "/pair/state", bearer(testToken))
		if code != 200 {
			t.Fatalf("GET /pair/state = %d %s", code, body)
		}
		return decode[PairDoc](t, body)
	}
	if d := state(); d.Mode != "unreachable" || !strings.Contains(d.Message, "not reachable") {
		t.Fatalf("no gateway: %+v", d)
	}
	if code, _, _ := b.get(t, "/pair/qr.png", bearer(testToken)); code != 404 {
		t.Errorf("qr.png with no QR = %d, want 404", code)
	}

	b.beat(t, "gateway", "web.1", bus.StateConnecting, bus.GatewayDetails{WAState: bus.StateConnecting})
	if d := state(); d.Mode != "waiting" {
		t.Fatalf("connecting: %+v", d)
	}

	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: "2@first-code,abc,def,ghi"})
	d := state()
	if d.Mode != "qr" || d.QRVersion != QRVersion("2@first-code,abc,def,ghi") || strings.Contains(mustJSON(t, d), "first-code") {
		t.Fatalf("qr: %+v", d)
	}
	code, png, resp := b.get(t, "/pair/qr.png", bearer(testToken))
	want, _ := RenderQR("2@first-code,abc,def,ghi")
	if code != 200 || resp.Header.Get("Content-Type") != "image/png" || !bytes.Equal([]byte(png), want) {
		t.Fatalf("qr.png = %d %s, %d bytes; want the rendered code", code, resp.Header.Get("Content-Type"), len(png))
	}
	if code, _, _ := b.get(t, "/pair/qr.png", nil); code != 401 {
		t.Errorf("qr.png without token = %d, want 401", code)
	}
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: "2@second-code,abc,def,ghi"})
	if d2 := state(); d2.QRVersion != QRVersion("2@second-code,abc,def,ghi") || d2.QRVersion == d.QRVersion {
		t.Fatalf("rotated qr: %+v", d2)
	}
	_, png2, _ := b.get(t, "/pair/qr.png", bearer(testToken))
	if png2 == png {
		t.Fatal("qr.png did not change after rotation")
	}

	b.conn(t, bus.ConnEvent{Kind: bus.ConnPairCode, Code: "ABCD-EFGH"})
	if d := state(); d.Mode != "code" || d.PairCode != "ABCD-EFGH" || d.PairPhone != "1555****321" {
		t.Fatalf("pair code: %+v", d)
	}

	b.conn(t, bus.ConnEvent{Kind: bus.ConnPaired, JID: "15551234567:3@s.whatsapp.net"})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnConnected})
	if d := state(); d.Mode != "linked" || d.LinkedAs != "1555****567" || d.PairCode != "" || d.QRVersion != 0 {
		t.Fatalf("linked: %+v", d)
	}
	if code, _, _ := b.get(t, "/pair/qr.png", bearer(testToken)); code != 404 {
		t.Errorf("qr.png once linked = %d, want 404", code)
	}
	code, page, _ := b.get(t, "/pair", bearer(testToken))
	if code != 200 || !strings.Contains(page, "linked as") || !strings.Contains(page, "1555****567") {
		t.Errorf("pair page once linked = %d: %s", code, page)
	}

	b.conn(t, bus.ConnEvent{Kind: bus.ConnLoggedOut, Reason: "401"})
	if d := state(); d.Mode != "logged_out" || d.LinkedAs != "" {
		t.Fatalf("logged out: %+v", d)
	}

	b.advance(t, 20*time.Second)
	if d := state(); d.Mode != "unreachable" || !strings.Contains(d.Message, "20s ago") {
		t.Fatalf("stale gateway: %+v", d)
	}
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	b.conn(t, bus.ConnEvent{Kind: bus.ConnReconnecting, Attempt: 1})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnReconnecting, Attempt: 2})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnConnected})
	b.send(t, b.subj.Conn("weird"), "conn", bus.ConnEvent{Event: b.event(), Kind: "weird"})
	b.send(t, b.subj.BackupDone(), "backup", bus.BackupDone{Event: b.event(), SnapshotID: 1, Reason: "scheduled", Bytes: 1 << 20, StoredBytes: 1 << 19, DurationMS: 300})
	b.send(t, b.subj.BackupDone(), "backup", bus.BackupDone{Event: b.event(), SnapshotID: 1, Reason: "manual", Bytes: 1 << 20, DurationMS: 40, Unchanged: true})
	b.send(t, b.subj.BackupFailed(), "backup", bus.BackupFailed{Event: b.event(), Reason: "shutdown", Error: "boom", Attempt: 1})
	b.send(t, b.subj.BackupFailed(), "backup", bus.BackupFailed{Event: b.event(), Reason: "Not A Reason!", Error: "boom", Attempt: 1})

	b.get(t, "/healthz", nil)
	code, body, resp := b.get(t, "/metrics", nil)
	if code != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("GET /metrics = %d %s", code, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{
		`blacksky_whatsapp_state{state="connected"} 1`,
		`blacksky_whatsapp_state{state="reconnecting"} 0`,
		`blacksky_whatsapp_connected 1`,
		`blacksky_whatsapp_reconnects_total 2`,
		`blacksky_whatsapp_gateway_reconnects 3`,
		`blacksky_whatsapp_conn_events_total{kind="reconnecting"} 2`,
		`blacksky_whatsapp_conn_events_total{kind="other"} 1`,
		`blacksky_snapshots_total{reason="scheduled",result="stored"} 1`,
		`blacksky_snapshots_total{reason="manual",result="unchanged"} 1`,
		`blacksky_snapshots_total{reason="shutdown",result="failed"} 1`,
		`blacksky_snapshots_total{reason="other",result="failed"} 1`,
		`blacksky_snapshot_duration_seconds_count 2`,
		`blacksky_snapshot_duration_seconds_bucket{le="0.05"} 1`,
		`blacksky_snapshot_bytes_count 2`,
		`blacksky_snapshot_stored_bytes_count 1`,
		`blacksky_heartbeat_age_seconds{service="gateway"} 0`,
		`blacksky_service_up{service="backup"} 1`,
		`blacksky_ready 1`,
		`go_goroutines `,
		`go_memstats_heap_inuse_bytes `,
		`process_resident_memory_bytes `,
		`blacksky_http_requests_total{code="200",route="healthz"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestRunStopsServingOnCancel(t *testing.T) {
	t.Parallel()
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := srv.Connect("health", logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(Options{NC: nc, Listener: ln, Session: "s", HealthCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	addr := "http://" + ln.Addr().String()
	if code, _, _ := do(t, http.MethodGet, addr+"/healthz", nil, nil); code != 200 {
		t.Fatalf("healthz = %d", code)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v, want nil after cancel", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("port still open after Run returned")
	}
}

func mustJSON(t testing.TB, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestLateHeartbeatDoesNotUndoANewerEvent(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.healthy(t)
	b.conn(t, bus.ConnEvent{Kind: bus.ConnDisconnected, Reason: "network"})
	// A beat the gateway sent a moment before that event, handled after it.
	hb := bus.Heartbeat{Service: "gateway", Instance: "web.1", State: bus.StateConnected}
	hb.Details, _ = json.Marshal(bus.GatewayDetails{WAState: bus.StateConnected})
	hb.Stamp("BLACKSKY-MD", b.clock.Now().Add(-time.Second))
	b.send(t, b.subj.Heartbeat("gateway"), "heartbeat.gateway", hb)
	if wa := b.svc.tracker.WhatsApp(); wa.State != StateDisconnected || wa.LastDisconnect != "network" {
		t.Fatalf("state = %q (%q), want disconnected", wa.State, wa.LastDisconnect)
	}
	// The next beat, sent after the event, applies.
	b.clock.Advance(time.Second)
	b.beat(t, "gateway", "web.1", bus.StateReconnecting, bus.GatewayDetails{WAState: bus.StateReconnecting})
	if wa := b.svc.tracker.WhatsApp(); wa.State != bus.StateReconnecting {
		t.Fatalf("state = %q, want reconnecting", wa.State)
	}
}

func TestExpiredQRIsNotShown(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.beat(t, "gateway", "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	exp := b.clock.Now().Add(20 * time.Second)
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: "2@expiring", ExpiresAt: &exp})
	state := func() PairDoc {
		t.Helper()
		_, body, _ := b.get(t, "/pair/state", bearer(testToken))
		return decode[PairDoc](t, body)
	}
	if d := state(); d.Mode != "qr" || d.QRExpiresAt == nil {
		t.Fatalf("fresh code: %+v", d)
	}
	b.advance(t, 10*time.Second)
	b.beat(t, "gateway", "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	b.advance(t, 11*time.Second)
	if d := state(); d.Mode != "waiting" || !strings.Contains(d.Message, "expired") {
		t.Fatalf("expired code: %+v", d)
	}
}
