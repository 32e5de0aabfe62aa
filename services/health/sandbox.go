package health

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// The WhatsApp sandbox (Options.Sandbox, WHATSAPP_SANDBOX): /status says
// "sandbox": true, /metrics exports blacksky_sandbox 1, and /pair shows a
// banner and a "link now" button beside the QR code that POSTs to
// /pair/link, which asks the sandbox to link (P.sandbox.link).

// sandboxLinkTimeout bounds the P.sandbox.link request.
const sandboxLinkTimeout = 10 * time.Second

// sandboxActionHeader must be on a /pair/link request. A cross-site form
// cannot set a header, and a cross-site fetch that sets one needs a CORS
// preflight we never answer: with the SameSite cookie and the Origin check,
// this keeps the button safe from cross-site requests.
const sandboxActionHeader = "X-Blacksky-Action"

func registerSandboxMetric(m *metrics, on bool) {
	v := 0.0
	if on {
		v = 1
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "blacksky_sandbox",
		Help: "1 when WHATSAPP_SANDBOX is on: the gateway talks to the built-in WhatsApp sandbox, not to WhatsApp.",
	}, func() float64 { return v }))
}

// SandboxLinkDoc answers POST /pair/link.
type SandboxLinkDoc struct {
	OK       bool   `json:"ok"`
	LinkedAs string `json:"linked_as,omitempty"` // masked JID
	Error    string `json:"error,omitempty"`
}

func (s *Service) pairLink(w http.ResponseWriter, r *http.Request) {
	if !s.guard(w, r, "/pair", false) {
		return
	}
	if !s.opts.Sandbox {
		http.NotFound(w, r)
		return
	}
	if r.Header.Get(sandboxActionHeader) != "link" || !sameOrigin(r) {
		writeJSON(w, http.StatusForbidden, SandboxLinkDoc{Error: "cross-site request refused"})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), sandboxLinkTimeout)
	defer cancel()
	var rep bus.SandboxLinkReply
	err := bus.Request(ctx, s.opts.NC, s.subj.SandboxLink(), bus.SandboxLinkRequest{}, &rep)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		writeJSON(w, http.StatusServiceUnavailable, SandboxLinkDoc{Error: "the gateway's sandbox is not answering (is the gateway running with WHATSAPP_SANDBOX=true?)"})
	case err != nil:
		writeJSON(w, http.StatusServiceUnavailable, SandboxLinkDoc{Error: s.redact("link request failed: " + err.Error())})
	case !rep.OK:
		writeJSON(w, http.StatusConflict, SandboxLinkDoc{Error: s.redact(rep.Error)})
	default:
		s.log.Info("health: sandbox linked from /pair")
		writeJSON(w, http.StatusOK, SandboxLinkDoc{OK: true, LinkedAs: MaskJID(rep.JID)})
	}
}

// sameOrigin accepts a request whose Origin (when the browser sends one)
// names this host.
func sameOrigin(r *http.Request) bool {
	o := r.Header.Get("Origin")
	if o == "" {
		return r.Header.Get("Sec-Fetch-Site") == "" || r.Header.Get("Sec-Fetch-Site") == "same-origin"
	}
	u, err := url.Parse(o)
	return err == nil && u.Host == r.Host
}
