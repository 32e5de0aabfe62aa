package health

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net/http"
	"strings"
	"time"

	"golang.org/x/time/rate"
)

// cookieName holds the sign-in cookie. Its value is an HMAC of a fixed label
// under HEALTH_TOKEN, not the token itself: a copied cookie opens the pages
// but does not reveal the token used elsewhere (NATS, deploy scripts).
const cookieName = "blacksky_health"

// access is the outcome of checking a request's credentials.
type access int

const (
	accessGranted   access = iota // valid token, or development with no token set
	accessMissing                 // no credentials sent
	accessWrong                   // credentials sent, not valid
	accessForbidden               // production with no HEALTH_TOKEN: nothing opens the pages
)

// auth checks HEALTH_TOKEN in the Authorization header or the sign-in cookie.
// The token is never read from the URL: Heroku's router logs query strings.
type auth struct {
	token      string
	cookie     string // expected cookie value
	production bool
	// failures slows down guessing through the sign-in form.
	failures *rate.Limiter
	now      func() time.Time
}

func newAuth(token string, production bool, now func() time.Time) *auth {
	a := &auth{token: token, production: production, now: now,
		failures: rate.NewLimiter(rate.Every(time.Second), 10)}
	if token != "" {
		a.cookie = cookieValue(token)
	}
	return a
}

func cookieValue(token string) string {
	mac := hmac.New(sha256.New, []byte(token))
	mac.Write([]byte("blacksky-health-signin-v1"))
	return hex.EncodeToString(mac.Sum(nil))
}

// open reports whether the protected pages need no token (development only).
func (a *auth) open() bool { return a.token == "" && !a.production }

func (a *auth) check(r *http.Request) access {
	if a.token == "" {
		if a.production {
			return accessForbidden
		}
		return accessGranted
	}
	sent := false
	if h := r.Header.Get("Authorization"); h != "" {
		sent = true
		scheme, cred, ok := strings.Cut(h, " ")
		if ok && strings.EqualFold(scheme, "Bearer") && equal(strings.TrimSpace(cred), a.token) {
			return accessGranted
		}
	}
	if c, err := r.Cookie(cookieName); err == nil && c.Value != "" {
		sent = true
		if equal(c.Value, a.cookie) {
			return accessGranted
		}
	}
	if sent {
		return accessWrong
	}
	return accessMissing
}

// equal compares in constant time (for equal lengths; the length of a token
// is not the secret).
func equal(got, want string) bool {
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// signIn checks a token from the form. After a burst of wrong tokens, from
// anyone, it refuses every attempt (even a right one) until the budget
// refills: otherwise a guesser would still learn which guess was right.
func (a *auth) signIn(token string) (ok, limited bool) {
	if a.token == "" {
		return false, false
	}
	now := a.now()
	if a.failures.TokensAt(now) < 1 {
		return false, true
	}
	if equal(token, a.token) {
		return true, false
	}
	a.failures.AllowN(now, 1)
	return false, false
}

// setCookie signs the browser in. Secure when the request came over https,
// directly or through Heroku's router (X-Forwarded-Proto).
func (a *auth) setCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{
		Name:     cookieName,
		Value:    a.cookie,
		Path:     "/",
		MaxAge:   int((30 * 24 * time.Hour).Seconds()),
		HttpOnly: true,
		Secure:   isHTTPS(r),
		SameSite: http.SameSiteStrictMode,
	})
}

func (a *auth) clearCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, Secure: isHTTPS(r), SameSite: http.SameSiteStrictMode})
}

func isHTTPS(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}
