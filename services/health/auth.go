package health

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// cookieName holds the sign-in cookie: "<issued unix seconds>.<mac>", the mac
// an HMAC of the issue time under a key drawn at random when the process
// starts (mixed with HEALTH_TOKEN). So a cookie
//   - expires: it opens the pages for cookieMaxAge after sign-in at most;
//   - reveals nothing about the token and cannot be used to test guesses of
//     it offline: the key never leaves the process;
//   - dies with the process: after a restart (or on another web dyno) the
//     operator signs in again, the price of keeping the key out of reach.
const cookieName = "blacksky_health"

// cookieMaxAge bounds how long one sign-in lasts.
const cookieMaxAge = 7 * 24 * time.Hour

// cookieSkew is how far ahead of our clock an issue time may be (a clock
// stepped back after sign-in).
const cookieSkew = time.Minute

// access is the outcome of checking a request's credentials.
type access int

const (
	accessGranted   access = iota // valid token, or development with no token set
	accessMissing                 // no credentials sent
	accessWrong                   // credentials sent, not valid
	accessForbidden               // production with no HEALTH_TOKEN: nothing opens the pages
)

// Wrong-token budget per client: a burst of guessBurst, then one a second.
const (
	guessBurst = 10
	guessEvery = time.Second
	// maxGuessers bounds the per-client table; the idlest entries go first.
	maxGuessers = 4096
)

// auth checks HEALTH_TOKEN in the Authorization header or the sign-in cookie.
// The token is never read from the URL: Heroku's router logs query strings.
type auth struct {
	token      string
	key        []byte // cookie MAC key: HMAC(random per process, token)
	production bool
	// heroku: requests come through Heroku's router, which says who the
	// client is (X-Forwarded-For) and how it connected (X-Forwarded-Proto).
	heroku bool
	now    func() time.Time

	mu       sync.Mutex
	guessers map[string]*guesser // client -> its wrong-token budget
}

// guesser is one client's budget of wrong tokens.
type guesser struct {
	lim  *rate.Limiter
	last time.Time // last wrong token
}

func newAuth(token string, production, heroku bool, now func() time.Time) *auth {
	a := &auth{token: token, production: production, heroku: heroku, now: now, guessers: map[string]*guesser{}}
	secret := make([]byte, 32)
	_, _ = rand.Read(secret) // crypto/rand.Read never fails (Go 1.24+)
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(token))
	a.key = m.Sum(nil)
	return a
}

func (a *auth) mac(label, value string) string {
	m := hmac.New(sha256.New, a.key)
	m.Write([]byte(label + "\x00" + value))
	return hex.EncodeToString(m.Sum(nil))
}

// issue returns a new sign-in cookie value.
func (a *auth) issue() string {
	at := strconv.FormatInt(a.now().Unix(), 10)
	return at + "." + a.mac("blacksky-health-signin-v2", at)
}

// validCookie checks the MAC and the age of a sign-in cookie value.
func (a *auth) validCookie(v string) bool {
	at, mac, ok := strings.Cut(v, ".")
	if !ok || !equal(mac, a.mac("blacksky-health-signin-v2", at)) {
		return false
	}
	sec, err := strconv.ParseInt(at, 10, 64)
	if err != nil {
		return false
	}
	age := a.now().Sub(time.Unix(sec, 0))
	return age < cookieMaxAge && age > -cookieSkew
}

// csrf is the token /signout wants with the cookie it ends: a page of ours
// carries it, another site cannot read it.
func (a *auth) csrf(cookie string) string {
	return a.mac("blacksky-health-signout", cookie)[:32]
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
		if a.validCookie(c.Value) {
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

// signIn checks a token from the form. The right token always signs in, so
// nobody can lock the operator out by guessing; wrong tokens are throttled
// per client (limited: this client spent its budget of wrong tokens).
func (a *auth) signIn(r *http.Request, token string) (ok, limited bool) {
	if a.token == "" {
		return false, false
	}
	if equal(token, a.token) {
		return true, false
	}
	return false, !a.wrong(r)
}

// wrong records a wrong token from r's client and reports whether it was
// within the client's budget; past it the caller answers 429.
func (a *auth) wrong(r *http.Request) bool {
	key := a.client(r)
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	g := a.guessers[key]
	if g == nil {
		if len(a.guessers) >= maxGuessers {
			a.evictLocked(now)
		}
		g = &guesser{lim: rate.NewLimiter(rate.Every(guessEvery), guessBurst)}
		a.guessers[key] = g
	}
	g.last = now
	return g.lim.AllowN(now, 1)
}

// evictLocked makes room in the table: first every client whose budget has
// refilled (forgetting it changes nothing), else the idlest one.
func (a *auth) evictLocked(now time.Time) {
	refill := guessBurst * guessEvery
	var idlest string
	var idlestAt time.Time
	for k, g := range a.guessers {
		if now.Sub(g.last) >= refill {
			delete(a.guessers, k)
			continue
		}
		if idlest == "" || g.last.Before(idlestAt) {
			idlest, idlestAt = k, g.last
		}
	}
	if len(a.guessers) >= maxGuessers {
		delete(a.guessers, idlest)
	}
}

// client names who sent r, for the wrong-token budget. Behind Heroku's
// router RemoteAddr is the router: the client is the hop the router appended
// to X-Forwarded-For, the last one of the first header (anything before it
// is whatever the client chose to send). IPv6 clients count by /64, the
// block one customer usually holds.
func (a *auth) client(r *http.Request) string {
	host := r.RemoteAddr
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if a.heroku {
		if xff := r.Header.Values("X-Forwarded-For"); len(xff) > 0 {
			hops := strings.Split(xff[0], ",")
			if hop := strings.TrimSpace(hops[len(hops)-1]); hop != "" {
				host = hop
			}
		}
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	addr = addr.Unmap()
	if addr.Is6() {
		p, _ := addr.Prefix(64)
		return p.String()
	}
	return addr.String()
}

// plainHTTP reports whether r reached Heroku's router over plain http, where
// a token or cookie would cross the internet readable.
func (a *auth) plainHTTP(r *http.Request) bool {
	return a.heroku && strings.EqualFold(strings.TrimSpace(r.Header.Get("X-Forwarded-Proto")), "http")
}

// setCookie signs the browser in. Secure when the request came over https,
// directly or through Heroku's router (X-Forwarded-Proto), and always on
// Heroku, which serves the app over https.
func (a *auth) setCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{
		Name:     cookieName,
		Value:    a.issue(),
		Path:     "/",
		MaxAge:   int(cookieMaxAge.Seconds()),
		HttpOnly: true,
		Secure:   a.secure(r),
		SameSite: http.SameSiteStrictMode,
	})
}

func (a *auth) clearCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, Secure: a.secure(r), SameSite: http.SameSiteStrictMode})
}

func (a *auth) secure(r *http.Request) bool { return a.heroku || isHTTPS(r) }

func isHTTPS(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}
