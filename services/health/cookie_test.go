package health

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// csrfOf reads the sign-out form's CSRF token from a rendered pair page.
func csrfOf(t testing.TB, page string) string {
	t.Helper()
	m := regexp.MustCompile(`name="csrf" value="([0-9a-f]+)"`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no csrf field in the pair page")
	}
	return m[1]
}

func signIn(t testing.TB, b *bundle) *http.Cookie {
	t.Helper()
	_, _, resp := do(t, http.MethodPost, b.url+"/signin", strings.NewReader(url.Values{"token": {testToken}}.Encode()),
		map[string]string{"Content-Type": "application/x-www-form-urlencoded"})
	cs := resp.Cookies()
	if len(cs) != 1 {
		t.Fatalf("sign-in cookies = %v", cs)
	}
	return cs[0]
}

// A sign-in lasts cookieMaxAge at most, whatever the browser keeps.
func TestSignInCookieExpires(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	c := signIn(t, b)
	if c.MaxAge <= 0 || time.Duration(c.MaxAge)*time.Second > cookieMaxAge {
		t.Errorf("cookie MaxAge = %d s; want up to %s", c.MaxAge, cookieMaxAge)
	}
	hdr := map[string]string{"Cookie": cookieName + "=" + c.Value}
	if code, _, _ := b.get(t, "/pair/state", hdr); code != 200 {
		t.Fatalf("fresh cookie: %d", code)
	}
	b.clock.Advance(cookieMaxAge - time.Minute)
	if code, _, _ := b.get(t, "/pair/state", hdr); code != 200 {
		t.Fatalf("cookie a minute before its end: %d", code)
	}
	b.clock.Advance(2 * time.Minute)
	if code, _, _ := b.get(t, "/pair/state", hdr); code != 401 {
		t.Fatalf("cookie past %s: %d; want 401", cookieMaxAge, code)
	}
	// Editing the issue time breaks the MAC.
	_, mac, _ := strings.Cut(c.Value, ".")
	forged := map[string]string{"Cookie": cookieName + "=" + "9999999999." + mac}
	if code, _, _ := b.get(t, "/pair/state", forged); code != 401 {
		t.Fatalf("cookie with an edited issue time: %d; want 401", code)
	}
}

// The cookie is no function of the token alone: knowing how it is built, a
// copied cookie still cannot be used to test guesses of the token offline.
func TestSignInCookieDoesNotTestTokenGuesses(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	c := signIn(t, b)
	at, mac, ok := strings.Cut(c.Value, ".")
	if !ok {
		t.Fatalf("cookie %q has no issue time", c.Value)
	}
	// The right guess, hashed every way the token alone allows, matches nothing.
	for _, label := range []string{"blacksky-health-signin-v1", "blacksky-health-signin-v2\x00" + at, at} {
		m := hmac.New(sha256.New, []byte(testToken))
		m.Write([]byte(label))
		if guess := hex.EncodeToString(m.Sum(nil)); guess == mac || guess == c.Value {
			t.Fatalf("the cookie is an HMAC of %q under the token", label)
		}
	}
	// Another process with the same token signs differently.
	other := newAuth(testToken, false, false, b.clock.Now)
	req, _ := http.NewRequest(http.MethodGet, "/status", nil)
	req.AddCookie(c)
	if other.check(req) == accessGranted {
		t.Fatal("a cookie from one process opens another's pages: its key depends on the token only")
	}
}

// /signout needs the CSRF token of the pair page: another site cannot sign
// the operator out.
func TestSignOutWantsTheCSRFToken(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	c := signIn(t, b)
	hdr := map[string]string{"Cookie": cookieName + "=" + c.Value, "Content-Type": "application/x-www-form-urlencoded"}
	for _, form := range []url.Values{{}, {"csrf": {"0123456789abcdef0123456789abcdef"}}} {
		code, _, resp := do(t, http.MethodPost, b.url+"/signout", strings.NewReader(form.Encode()), hdr)
		if code != http.StatusForbidden || len(resp.Cookies()) != 0 {
			t.Errorf("sign-out with csrf %q = %d, cookies %v; want 403 and nothing cleared", form.Get("csrf"), code, resp.Cookies())
		}
	}
	_, page, _ := b.get(t, "/pair", hdr)
	code, _, resp := do(t, http.MethodPost, b.url+"/signout", strings.NewReader(url.Values{"csrf": {csrfOf(t, page)}}.Encode()), hdr)
	if cs := resp.Cookies(); code != http.StatusSeeOther || len(cs) != 1 || cs[0].MaxAge >= 0 {
		t.Errorf("sign-out with the page's token = %d, cookies %v; want 303 clearing the cookie", code, cs)
	}
}
