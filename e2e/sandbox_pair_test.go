package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/blacksky-md/blacksky/internal/testdep"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// TestSandboxPairPageLinkNow: in the shipped binary in sandbox mode, /pair
// shows the QR code with a "link now" button; clicking it links the device
// through the real gateway and the page says "linked as …".
func TestSandboxPairPageLinkNow(t *testing.T) {
	chromium := testdep.Chromium(t)
	bin := buildBinary(t)
	e := sandboxEnv(t, t.TempDir(), "")
	p := start(t, bin, "run (sandbox)", e, "run")
	w := watchSandbox(t, e, p)

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck, chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true), chromedp.UserDataDir(t.TempDir()))
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 60*time.Second)
	defer cancelT()
	if err := chromedp.Do(ctx,
		chromedp.Navigate("http://127.0.0.1:"+e["PORT"]+"/pair"),
		chromedp.WaitVisible("#token"),
		chromedp.SendKeys("#token", e["HEALTH_TOKEN"]),
		chromedp.Submit("#token"),
		chromedp.WaitVisible("#sandbox-banner"),
		chromedp.WaitVisible("#link-now"),
		chromedp.Click("#link-now"),
		chromedp.WaitVisible("#linked-box"),
	); err != nil {
		t.Fatalf("link now on /pair: %v", err)
	}
	linked, err := chromedp.Run(ctx, chromedp.Text("#linked-box"))
	if err != nil {
		t.Fatal(err)
	}
	paired := w.next(bus.ConnPaired)
	w.next(bus.ConnConnected)
	if !strings.Contains(linked, "linked as ") || !strings.Contains(linked, "****") {
		t.Errorf("the page says %q", linked)
	}
	if strings.Contains(linked, strings.Split(paired.JID, ":")[0]) {
		t.Errorf("the page shows the whole number %s", paired.JID)
	}
	p.stop(t, 30*time.Second)
}
