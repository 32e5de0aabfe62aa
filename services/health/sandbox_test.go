package health

import (
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/chromedp/chromedp"
	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// answerLink answers P.sandbox.link as the gateway's sandbox would and, on
// success, says paired and connected on the bus.
func answerLink(t *testing.T, b *bundle, reply bus.SandboxLinkReply) *atomic.Int64 {
	t.Helper()
	calls := new(atomic.Int64)
	sub, err := b.pub.Subscribe(b.subj.SandboxLink(), func(m *nats.Msg) {
		calls.Add(1)
		_ = bus.Respond(m, reply)
		if reply.OK {
			for _, kind := range []string{bus.ConnPaired, bus.ConnConnected} {
				ev := bus.ConnEvent{Kind: kind, JID: reply.JID}
				ev.Stamp(b.opts.Session, b.clock.Now())
				_ = bus.Publish(b.pub, b.subj.Conn(kind), ev)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := b.pub.Flush(); err != nil {
		t.Fatal(err)
	}
	return calls
}

func TestSandboxModeIsShownOnStatusMetricsAndPair(t *testing.T) {
	b := setup(t, func(o *Options) { o.Sandbox = true })
	b.healthy(t)
	_, body, _ := b.get(t, "/status", nil)
	if doc := decode[StatusDoc](t, body); !doc.Sandbox {
		t.Errorf("/status without a token does not say sandbox: %s", body)
	}
	_, body, _ = b.get(t, "/metrics", nil)
	if !strings.Contains(body, "\nblacksky_sandbox 1\n") {
		t.Error("/metrics has no blacksky_sandbox 1")
	}
	b.beat(t, bus.ServiceGateway, "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: "2@ref,noise,identity,adv"})
	code, body, _ := b.get(t, "/pair", bearer(testToken))
	if code != http.StatusOK || !strings.Contains(body, `id="link-now"`) || !strings.Contains(body, "Sandbox mode") {
		t.Errorf("/pair in sandbox mode: %d, no banner or link button", code)
	}

	off := setup(t, nil)
	_, body, _ = off.get(t, "/metrics", nil)
	if !strings.Contains(body, "\nblacksky_sandbox 0\n") {
		t.Error("/metrics without the sandbox has no blacksky_sandbox 0")
	}
	off.beat(t, bus.ServiceGateway, "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	off.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: "2@ref,noise,identity,adv"})
	if _, body, _ = off.get(t, "/pair", bearer(testToken)); strings.Contains(body, "link-now") {
		t.Error("/pair offers link now without the sandbox")
	}
	if code, _, _ := do(t, http.MethodPost, off.url+"/pair/link", nil, map[string]string{
		"Authorization": "Bearer " + testToken, "X-Blacksky-Action": "link"}); code != http.StatusNotFound {
		t.Errorf("POST /pair/link without the sandbox: %d, want 404", code)
	}
}

func TestPairLinkNowAsksTheSandbox(t *testing.T) {
	b := setup(t, func(o *Options) { o.Sandbox = true })
	calls := answerLink(t, b, bus.SandboxLinkReply{OK: true, JID: "15551234567:7@s.whatsapp.net"})
	hdr := map[string]string{"Authorization": "Bearer " + testToken, "X-Blacksky-Action": "link"}

	if code, _, _ := do(t, http.MethodPost, b.url+"/pair/link", nil, map[string]string{"X-Blacksky-Action": "link"}); code != http.StatusUnauthorized {
		t.Errorf("without the token: %d, want 401", code)
	}
	if code, _, _ := do(t, http.MethodPost, b.url+"/pair/link", nil, bearer(testToken)); code != http.StatusForbidden {
		t.Errorf("without the action header (a cross-site form): %d, want 403", code)
	}
	cross := map[string]string{"Authorization": "Bearer " + testToken, "X-Blacksky-Action": "link", "Origin": "https://evil.example"}
	if code, _, _ := do(t, http.MethodPost, b.url+"/pair/link", nil, cross); code != http.StatusForbidden {
		t.Errorf("from another origin: %d, want 403", code)
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("refused requests reached the sandbox %d times", n)
	}
	code, body, _ := do(t, http.MethodPost, b.url+"/pair/link", nil, hdr)
	doc := decode[SandboxLinkDoc](t, body)
	if code != http.StatusOK || !doc.OK || doc.LinkedAs != "1555****567" {
		t.Errorf("link now: %d %+v", code, doc)
	}

	refused := setup(t, func(o *Options) { o.Sandbox = true })
	answerLink(t, refused, bus.SandboxLinkReply{Error: "not pairing: the QR codes expired"})
	code, body, _ = do(t, http.MethodPost, refused.url+"/pair/link", nil, hdr)
	if doc := decode[SandboxLinkDoc](t, body); code != http.StatusConflict || !strings.Contains(doc.Error, "expired") {
		t.Errorf("refused link: %d %+v", code, doc)
	}
	none := setup(t, func(o *Options) { o.Sandbox = true })
	if code, _, _ := do(t, http.MethodPost, none.url+"/pair/link", nil, hdr); code != http.StatusServiceUnavailable {
		t.Errorf("no sandbox answering: %d, want 503", code)
	}
}

func TestPairLinkNowInChromium(t *testing.T) {
	b := setup(t, func(o *Options) { o.Sandbox = true })
	answerLink(t, b, bus.SandboxLinkReply{OK: true, JID: "15551234567:7@s.whatsapp.net"})
	ctx := browser(t)
	step(t, ctx, "open /pair",
		chromedp.EmulateViewport(390, 844, chromedp.EmulatePortrait),
		chromedp.Navigate(b.url+"/pair"),
		chromedp.WaitVisible("#token"),
		chromedp.SendKeys("#token", testToken),
		chromedp.Submit("#token"),
		chromedp.WaitVisible("#pair"),
	)
	b.beat(t, bus.ServiceGateway, "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	code := "2@SandboxRef0123456789,Noise/AbCdEf0123456789=,Id1,Adv1"
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: code})
	waitQR(t, ctx, strconv.FormatInt(QRVersion(code), 10))
	step(t, ctx, "link now", chromedp.WaitVisible("#link-now"), chromedp.Click("#link-now"),
		chromedp.WaitVisible("#linked-box"), chromedp.WaitNotVisible("#qr-box"))
	if linked := value(t, ctx, "linked text", chromedp.Text("#linked-box")); !strings.Contains(linked, "linked as 1555****567") {
		t.Fatalf("after link now the page says %q", linked)
	}
	if banner := value(t, ctx, "banner", chromedp.Text("#sandbox-banner")); !strings.Contains(banner, "not WhatsApp") {
		t.Errorf("sandbox banner %q", banner)
	}
}
