package health

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// routes builds the mux. Every handler is wrapped to count requests by route
// and status code.
func (s *Service) routes() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern, route string, h http.HandlerFunc) {
		mux.Handle(pattern, s.counted(route, h))
	}
	// Pages that take the token or set the cookie refuse plain http on Heroku.
	private := func(pattern, route string, h http.HandlerFunc) {
		handle(pattern, route, s.httpsOnly(h))
	}
	handle("GET /healthz", "healthz", s.healthz)
	handle("GET /readyz", "readyz", s.readyz)
	private("GET /status", "status", s.status)
	mux.Handle("GET /metrics", s.counted("metrics", s.metrics.handler()))
	private("GET /pair", "pair", s.pairPage)
	private("GET /pair/state", "pair_state", s.pairState)
	private("GET /pair/qr.png", "pair_qr", s.pairQR)
	private("POST /pair/link", "pair_link", s.pairLink)
	private("POST /signin", "signin", s.signIn)
	private("POST /signout", "signout", s.signOut)
	handle("GET /assets/{file}", "assets", s.asset)
	private("/riverui/", "riverui", s.riverUI)
	handle("GET /{$}", "index", s.index)
	return mux
}

// statusRecorder remembers the status code for the request counter.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Flush keeps streaming working through the wrapper (River UI, metrics).
func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (s *Service) counted(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		code := rec.code
		if code == 0 {
			code = http.StatusOK
		}
		s.metrics.requests.WithLabelValues(route, strconv.Itoa(code)).Inc()
	})
}

func (s *Service) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write([]byte("ok\n"))
}

// httpsOnly sends a request that reached Heroku's router over plain http to
// the same path over https on HEROKU_APP_URL's host (308 keeps the method and
// body), before any token is checked or cookie set. The request's own Host
// is never used: whoever sends it chooses it.
func (s *Service) httpsOnly(h http.HandlerFunc) http.HandlerFunc {
	host := ""
	if u, err := url.Parse(s.opts.PublicURL); err == nil {
		host = u.Host
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.auth.plainHTTP(r) {
			h(w, r)
			return
		}
		if host == "" {
			http.Error(w, "use https (set HEROKU_APP_URL to be redirected)", http.StatusBadRequest)
			return
		}
		u := url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
		http.Redirect(w, r, u.String(), http.StatusPermanentRedirect)
	}
}

// readyDoc is the /readyz body.
type readyDoc struct {
	Ready   bool     `json:"ready"`
	Reasons []string `json:"reasons"`
}

func (s *Service) readyz(w http.ResponseWriter, _ *http.Request) {
	ready, reasons := s.tracker.Ready(s.req)
	if reasons == nil {
		reasons = []string{}
	}
	code := http.StatusOK
	if !ready {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, readyDoc{Ready: ready, Reasons: s.redactAll(reasons)})
}

func (s *Service) index(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("BLACKSKY-MD health service\n\n" +
		"/healthz  liveness\n/readyz   readiness (503 with reasons)\n/status   JSON status\n" +
		"/metrics  Prometheus\n/pair     link WhatsApp (QR or pairing code)\n/riverui/ backup jobs (PostgreSQL only)\n"))
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// guard answers for a protected route when access is not granted and reports
// whether the handler may go on. Pages get the sign-in form; APIs get JSON.
func (s *Service) guard(w http.ResponseWriter, r *http.Request, next string, page bool) bool {
	switch s.auth.check(r) {
	case accessGranted:
		return true
	case accessForbidden:
		msg := "This page is disabled: set HEALTH_TOKEN (a long random string, e.g. `openssl rand -hex 32`) " +
			"in the environment to open it. In production it never opens without a token."
		if page {
			s.renderMessage(w, http.StatusForbidden, "Set HEALTH_TOKEN", msg)
		} else {
			writeJSON(w, http.StatusForbidden, map[string]string{"error": msg})
		}
		return false
	case accessWrong:
		if !s.auth.wrong(r) {
			s.tooMany(w, r, next, page)
			return false
		}
		if page {
			s.renderSignIn(w, r, http.StatusUnauthorized, next, "That token is not right.")
		} else {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "wrong token"})
		}
		return false
	default:
		w.Header().Set("WWW-Authenticate", `Bearer realm="blacksky"`)
		if page {
			s.renderSignIn(w, r, http.StatusUnauthorized, next, "")
		} else {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "token required (Authorization: Bearer ...)"})
		}
		return false
	}
}

// tooMany answers a client that sent too many wrong tokens.
func (s *Service) tooMany(w http.ResponseWriter, r *http.Request, next string, page bool) {
	const msg = "Too many wrong tokens; wait a few seconds and try again."
	w.Header().Set("Retry-After", strconv.Itoa(int(guessEvery.Seconds())))
	if page {
		s.renderSignIn(w, r, http.StatusTooManyRequests, next, msg)
	} else {
		writeJSON(w, http.StatusTooManyRequests, map[string]string{"error": msg})
	}
}

// safeNext keeps the post-sign-in redirect on our own pages.
func safeNext(next string) string {
	switch {
	case next == "/pair", next == "/status", next == "/riverui/":
		return next
	case strings.HasPrefix(next, "/riverui/") && !strings.ContainsAny(next, "\\\r\n") && !strings.HasPrefix(next, "//"):
		return next
	}
	return "/pair"
}

func (s *Service) signIn(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 8<<10)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad form", http.StatusBadRequest)
		return
	}
	next := safeNext(r.PostForm.Get("next"))
	if s.auth.token == "" {
		if s.auth.production {
			s.guard(w, r, next, true)
			return
		}
		http.Redirect(w, r, next, http.StatusSeeOther) // open in development
		return
	}
	ok, limited := s.auth.signIn(r, r.PostForm.Get("token"))
	switch {
	case limited:
		s.tooMany(w, r, next, true)
	case !ok:
		s.log.Warn("health: wrong token at sign-in", "remote", r.RemoteAddr)
		s.renderSignIn(w, r, http.StatusUnauthorized, next, "That token is not right.")
	default:
		s.auth.setCookie(w, r)
		http.Redirect(w, r, next, http.StatusSeeOther)
	}
}

// signOut ends the sign-in of the cookie sent, when the form carries that
// cookie's CSRF token (the pair page's sign-out button does): another site
// cannot sign the operator out.
func (s *Service) signOut(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 8<<10)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "bad form", http.StatusBadRequest)
		return
	}
	if c, err := r.Cookie(cookieName); err == nil && c.Value != "" &&
		!equal(r.PostForm.Get("csrf"), s.auth.csrf(c.Value)) {
		http.Error(w, "sign-out refused: use the Sign out button of the pair page", http.StatusForbidden)
		return
	}
	s.auth.clearCookie(w, r)
	http.Redirect(w, r, "/pair", http.StatusSeeOther)
}

func (s *Service) riverUI(w http.ResponseWriter, r *http.Request) {
	api := strings.HasPrefix(r.URL.Path, "/riverui/api/")
	if !s.guard(w, r, safeNext(r.URL.Path), !api) {
		return
	}
	if s.opts.RiverUI == nil {
		http.Error(w, "River UI is only available when DATABASE_URL is PostgreSQL.", http.StatusNotFound)
		return
	}
	s.riverMu.RLock()
	err := s.riverErr
	s.riverMu.RUnlock()
	if err != nil {
		http.Error(w, "River UI did not start (is the database reachable?); see the logs.", http.StatusServiceUnavailable)
		return
	}
	s.opts.RiverUI.ServeHTTP(w, r)
}
