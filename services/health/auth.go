package health

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
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
	cookie     string // expected cookie value
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
		Value:    a.cookie,
		Path:     "/",
		MaxAge:   int((30 * 24 * time.Hour).Seconds()),
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
