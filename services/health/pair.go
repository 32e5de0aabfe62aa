package health

import (
	"embed"
	"html/template"
	"net/http"
	"path"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	qrcode "github.com/skip2/go-qrcode"
)

//go:embed web/*.html web/assets/*
var webFS embed.FS

var pages = template.Must(template.ParseFS(webFS, "web/*.html"))

// PairDoc is what the pair page shows; /pair/state returns it as JSON and
// the page polls it every 1.5 s. The JID is masked; the QR itself is only
// served as an image, at /pair/qr.png.
type PairDoc struct {
	// Mode decides what the page shows: unreachable, waiting, qr, code,
	// linked or logged_out.
	Mode         string     `json:"mode"`
	State        string     `json:"state"`
	Message      string     `json:"message"`
	QRVersion    int64      `json:"qr_version,omitempty"`
	QRExpiresAt  *time.Time `json:"qr_expires_at,omitempty"`
	PairCode     string     `json:"pair_code,omitempty"`
	PairPhone    string     `json:"pair_phone,omitempty"` // masked
	LinkedAs     string     `json:"linked_as,omitempty"`  // masked JID
	GatewayAgeMS *int64     `json:"gateway_age_ms,omitempty"`
	Open         bool       `json:"open"`              // no token needed (development)
	Sandbox      bool       `json:"sandbox,omitempty"` // WHATSAPP_SANDBOX: "link now" instead of a scan
}

func (s *Service) pairDoc() PairDoc {
	gw := s.tracker.Service(bus.ServiceGateway)
	wa := s.tracker.WhatsApp()
	d := PairDoc{State: wa.State, Open: s.auth.open(), Sandbox: s.opts.Sandbox}
	if s.opts.PairPhone != "" {
		d.PairPhone = MaskJID(s.opts.PairPhone)
	}
	if gw.Seen {
		age := gw.Age.Milliseconds()
		d.GatewayAgeMS = &age
	}
	switch {
	case !gw.Fresh:
		d.Mode = "unreachable"
		if gw.Seen {
			d.Message = "The gateway is not reachable: its last heartbeat was " + gw.Age.Round(time.Second).String() +
				" ago. This page updates by itself when it is back."
		} else {
			d.Message = "The gateway is not reachable: no heartbeat from it yet. Is it running? " +
				"This page updates by itself when it is."
		}
	case wa.State == bus.StateLoggedOut:
		d.Mode = "logged_out"
		d.Message = "WhatsApp logged this device out. The gateway will offer a new code to link it again."
	case wa.State == bus.StatePairing && wa.PairCode != "":
		d.Mode, d.PairCode = "code", wa.PairCode
		d.Message = "On the phone: WhatsApp > Linked devices > Link a device > Link with phone number instead, then enter this code."
	case wa.State == bus.StatePairing && wa.QR != "" && wa.QRExpiresAt != nil && s.clock.Now().After(*wa.QRExpiresAt):
		// An expired code cannot link; showing it would only waste a scan.
		d.Mode = "waiting"
		d.Message = "The QR code expired; waiting for the gateway to offer a new one."
	case wa.State == bus.StatePairing && wa.QR != "":
		d.Mode, d.QRVersion, d.QRExpiresAt = "qr", wa.QRVersion, wa.QRExpiresAt
		d.Message = "On the phone: WhatsApp > Linked devices > Link a device, then scan this code. It changes every few seconds; this page follows."
	case wa.JID != "" || wa.Paired:
		d.Mode, d.LinkedAs = "linked", MaskJID(wa.JID)
		d.Message = "WhatsApp is " + humanState(wa.State) + "."
	default:
		d.Mode = "waiting"
		d.Message = "Waiting for the gateway (WhatsApp is " + humanState(wa.State) + ")."
		if d.PairPhone != "" {
			d.Message = "Waiting for a pairing code for " + d.PairPhone + " (WhatsApp is " + humanState(wa.State) + ")."
		}
	}
	d.State, d.Message = s.redact(d.State), s.redact(d.Message)
	return d
}

func humanState(state string) string {
	switch state {
	case StateUnknown:
		return "in an unknown state"
	case bus.StateWaitingRestore:
		return "waiting for the session to be restored"
	case bus.StateStandby:
		return "on standby: another instance holds the session"
	}
	return state
}

func (s *Service) securityHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "+
		"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
}

func (s *Service) pairPage(w http.ResponseWriter, r *http.Request) {
	if !s.guard(w, r, "/pair", true) {
		return
	}
	csrf := ""
	if c, err := r.Cookie(cookieName); err == nil && c.Value != "" {
		csrf = s.auth.csrf(c.Value)
	}
	s.render(w, http.StatusOK, "pair.html", map[string]any{
		"Doc":      s.pairDoc(),
		"Session":  s.opts.Session,
		"HasToken": s.opts.Token != "",
		"CSRF":     csrf,
	})
}

func (s *Service) pairState(w http.ResponseWriter, r *http.Request) {
	if !s.guard(w, r, "/pair", false) {
		return
	}
	writeJSON(w, http.StatusOK, s.pairDoc())
}

func (s *Service) pairQR(w http.ResponseWriter, r *http.Request) {
	if !s.guard(w, r, "/pair", false) {
		return
	}
	wa := s.tracker.WhatsApp()
	if wa.State != bus.StatePairing || wa.QR == "" {
		http.Error(w, "no QR code right now", http.StatusNotFound)
		return
	}
	png, err := s.qr.png(wa.QRVersion, wa.QR)
	if err != nil {
		s.log.Warn("health: rendering the QR code", "err", err)
		http.Error(w, "could not render the QR code", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(png)
}

// qrCache renders each QR code once: the page asks for it on every poll that
// sees a new version, and encoding costs a few milliseconds.
type qrCache struct {
	mu      sync.Mutex
	version int64
	code    string
	data    []byte
}

// QRSize is the side of the QR image in pixels.
const QRSize = 320

func (c *qrCache) png(version int64, code string) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.data != nil && c.version == version && c.code == code {
		return c.data, nil
	}
	data, err := RenderQR(code)
	if err != nil {
		return nil, err
	}
	c.version, c.code, c.data = version, code, data
	return data, nil
}

// RenderQR draws a WhatsApp QR code string as a PNG.
func RenderQR(code string) ([]byte, error) {
	return qrcode.Encode(code, qrcode.Medium, QRSize)
}

func (s *Service) asset(w http.ResponseWriter, r *http.Request) {
	name := path.Base(r.PathValue("file"))
	data, err := webFS.ReadFile("web/assets/" + name)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	switch path.Ext(name) {
	case ".js":
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
	case ".css":
		w.Header().Set("Content-Type", "text/css; charset=utf-8")
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "public, max-age=300")
	_, _ = w.Write(data)
}

func (s *Service) render(w http.ResponseWriter, code int, name string, data any) {
	s.securityHeaders(w)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	if err := pages.ExecuteTemplate(w, name, data); err != nil {
		s.log.Warn("health: rendering a page", "page", name, "err", err)
	}
}

func (s *Service) renderSignIn(w http.ResponseWriter, _ *http.Request, code int, next, problem string) {
	s.render(w, code, "signin.html", map[string]any{"Next": next, "Problem": problem, "Session": s.opts.Session})
}

func (s *Service) renderMessage(w http.ResponseWriter, code int, title, msg string) {
	s.render(w, code, "message.html", map[string]any{"Title": title, "Message": msg, "Session": s.opts.Session})
}
