package health

import (
	"bytes"
	"context"
	"encoding/base64"
	"image"
	"image/color"
	"image/png"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testdep"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/chromedp/chromedp"
)

// browser starts headless Chromium (Debian's package) with the flags this
// machine's closed network needs, and a fresh profile.
func browser(t *testing.T) context.Context {
	t.Helper()
	chromiumPath := testdep.Chromium(t)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(allocCtx)
	t.Cleanup(func() { cancelCtx(); cancelAlloc() })
	return ctx
}

// step runs browser actions with a deadline, so a stuck page fails the test
// instead of hanging it.
func step(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- chromedp.Do(ctx, actions...) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: no result after 30 s", what)
	}
}

func value[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

// shownQR draws the page's QR image on a canvas and returns it decoded: what
// the person actually sees, not just the src attribute.
func shownQR(t *testing.T, ctx context.Context) image.Image {
	t.Helper()
	dataURL := value(t, ctx, "read the QR image", chromedp.Evaluate[string](`(() => {
		const i = document.getElementById("qr");
		const c = document.createElement("canvas");
		c.width = i.naturalWidth; c.height = i.naturalHeight;
		c.getContext("2d").drawImage(i, 0, 0);
		return c.toDataURL("image/png");
	})()`))
	data, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(dataURL, "data:image/png;base64,"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// sameModules compares two QR images pixel by pixel as black or white.
func sameModules(a, b image.Image) bool {
	if a.Bounds() != b.Bounds() {
		return false
	}
	for y := a.Bounds().Min.Y; y < a.Bounds().Max.Y; y++ {
		for x := a.Bounds().Min.X; x < a.Bounds().Max.X; x++ {
			ga := color.GrayModel.Convert(a.At(x, y)).(color.Gray).Y < 128
			gb := color.GrayModel.Convert(b.At(x, y)).(color.Gray).Y < 128
			if ga != gb {
				return false
			}
		}
	}
	return true
}

func rendered(t *testing.T, code string) image.Image {
	t.Helper()
	data, err := RenderQR(code)
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// waitQR waits until the page shows the QR of the given version, loaded.
func waitQR(t *testing.T, ctx context.Context, version string) {
	t.Helper()
	step(t, ctx, "QR version "+version+" shown", chromedp.Action[chromedp.Void](func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := chromedp.Poll[bool](`(() => {
			const i = document.getElementById("qr");
			return !document.getElementById("qr-box").hidden && i.complete && i.naturalWidth > 0 &&
				i.getAttribute("src") === "/pair/qr.png?v=`+version+`";
		})()`, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(20*time.Second))(ctx, tg)
		return chromedp.Void{}, err
	}))
}

func TestPairPageInChromium(t *testing.T) {
	b := setup(t, func(o *Options) { o.PairPhone = "" })
	ctx := browser(t)

	// A phone-sized viewport; the sign-in form comes first.
	step(t, ctx, "open /pair",
		chromedp.EmulateViewport(390, 844, chromedp.EmulatePortrait),
		chromedp.Navigate(b.url+"/pair"),
		chromedp.WaitVisible("#token"),
		chromedp.SendKeys("#token", testToken),
		chromedp.Submit("#token"),
		chromedp.WaitVisible("#pair"),
	)
	msg := value(t, ctx, "message", chromedp.Text("#message"))
	if !strings.Contains(msg, "not reachable") {
		t.Fatalf("before any gateway heartbeat the page says %q", msg)
	}

	// The gateway starts pairing: a QR code appears without a reload.
	b.beat(t, bus.ServiceGateway, "web.1", bus.StatePairing, bus.GatewayDetails{WAState: bus.StatePairing})
	code1 := "2@FirstRefAbCdEf0123456789,KeyOne/AbCdEfGhIjKlMnOpQrStUvWxYz0123456789=,Id1,AdvSecret1"
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: code1})
	waitQR(t, ctx, strconv.FormatInt(QRVersion(code1), 10))
	first := shownQR(t, ctx)
	if !sameModules(first, rendered(t, code1)) {
		t.Fatal("the page does not show the QR of the first code")
	}
	shot := value(t, ctx, "screenshot", chromedp.FullScreenshot(100))
	if err := os.WriteFile("/tmp/health-pair-qr.png", shot, 0o644); err != nil {
		t.Logf("screenshot not written: %v", err)
	}

	// WhatsApp rotates the code: the image is replaced.
	code2 := "2@SecondRefZyXwVu9876543210,KeyTwo/ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210=,Id2,AdvSecret2"
	b.conn(t, bus.ConnEvent{Kind: bus.ConnQR, Code: code2})
	waitQR(t, ctx, strconv.FormatInt(QRVersion(code2), 10))
	second := shownQR(t, ctx)
	if sameModules(first, second) {
		t.Fatal("the QR image did not change after rotation")
	}
	if !sameModules(second, rendered(t, code2)) {
		t.Fatal("the page does not show the QR of the rotated code")
	}

	// Paired and connected: "linked as" with the masked number.
	b.conn(t, bus.ConnEvent{Kind: bus.ConnPaired, JID: "15551234567:7@s.whatsapp.net"})
	b.conn(t, bus.ConnEvent{Kind: bus.ConnConnected})
	step(t, ctx, "linked shown", chromedp.WaitVisible("#linked-box"), chromedp.WaitNotVisible("#qr-box"))
	linked := value(t, ctx, "linked text", chromedp.Text("#linked-box"))
	if !strings.Contains(linked, "linked as 1555****567") {
		t.Fatalf("linked box says %q", linked)
	}
	html := value(t, ctx, "page html", chromedp.Evaluate[string](`document.documentElement.outerHTML`))
	if strings.Contains(html, "15551234567") || strings.Contains(html, testToken) {
		t.Fatal("the page shows the whole number or the token")
	}
	shot = value(t, ctx, "screenshot", chromedp.FullScreenshot(100))
	if err := os.WriteFile("/tmp/health-pair-linked.png", shot, 0o644); err != nil {
		t.Logf("screenshot not written: %v", err)
	}
}
