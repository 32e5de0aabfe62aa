package gateway

import (
	"context"
	"slices"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
	"go.mau.fi/whatsmeow/types/events"
)

func (g *Gateway) onQR(ctx context.Context, codes []string) {
	stopTimer(&g.watch)
	g.qrCodes = slices.Clone(codes)
	g.qrFirst = true
	g.nextQR()
	if g.cfg.PairPhone != "" && !g.pairAsked {
		g.pairAsked = true
		g.askPairCode(ctx)
	}
}

// nextQR publishes the next QR code, or, when WhatsApp's codes are used up,
// drops the socket and starts a fresh pairing round (with a fresh backoff:
// an unscanned code is not a failure of the network).
func (g *Gateway) nextQR() {
	if len(g.qrCodes) == 0 {
		g.mu.Lock()
		g.st.attempt = 0
		g.mu.Unlock()
		g.dropAndRetry("pairing codes expired without a scan", false)
		return
	}
	code := g.qrCodes[0]
	g.qrCodes = g.qrCodes[1:]
	ttl := nextQRTTL
	if g.qrFirst {
		ttl, g.qrFirst = firstQRTTL, false
	}
	exp := g.clock.Now().Add(ttl).UTC()
	g.qrTimer = g.clock.NewTimer(ttl)
	g.setState(bus.StatePairing, "")
	g.mu.Lock()
	g.st.qrCode, g.st.qrExpires = code, exp
	g.mu.Unlock()
	g.publish(bus.ConnEvent{Kind: bus.ConnQR, Code: code, ExpiresAt: &exp})
	if g.cfg.PairPhone == "" {
		g.log.Info("scan the QR code with WhatsApp > Linked devices (also on /pair)", "expires_at", exp)
		if g.showQR != nil {
			g.showQR(code)
		}
	}
}

// askPairCode requests a pairing code off the loop (it is a round trip to
// WhatsApp) and hands the answer back; an answer for an older socket is
// ignored.
func (g *Gateway) askPairCode(ctx context.Context) {
	conn, gen, phone := g.lc, g.gen, g.cfg.PairPhone
	g.bg.Go(func() {
		code, err := conn.PairPhone(ctx, phone)
		select {
		case g.results <- func(context.Context) { g.onPairCode(gen, code, err) }:
		case <-ctx.Done():
		}
	})
}

func (g *Gateway) onPairCode(gen uint64, code string, err error) {
	if gen != g.gen || g.State() != bus.StatePairing {
		return
	}
	if err != nil {
		g.log.Error("pairing code request failed; the QR code still works", "err", err)
		return
	}
	g.mu.Lock()
	g.st.pairCode = code
	g.mu.Unlock()
	g.publish(bus.ConnEvent{Kind: bus.ConnPairCode, Code: code})
	if g.cfg.Production {
		// Logs leave the process (Heroku drains, add-ons): whoever reads a
		// code there could link the bot to their own phone.
		g.log.Info("pairing code ready: read it on /pair (with HEALTH_TOKEN), then WhatsApp > Linked devices > Link with phone number")
		return
	}
	g.log.Info("enter this pairing code in WhatsApp > Linked devices > Link with phone number", "code", code)
}

func (g *Gateway) onPaired(e *events.PairSuccess) {
	g.stopTimers()
	jid := e.ID.String()
	g.mu.Lock()
	g.st.jid = jid
	g.mu.Unlock()
	// whatsmeow reconnects by itself right after pairing (stream error 515);
	// the watchdog catches the case where that reconnect fails silently.
	g.setState(bus.StateConnecting, "")
	g.watch = g.clock.NewTimer(g.cfg.LoginTimeout)
	g.publish(bus.ConnEvent{Kind: bus.ConnPaired, JID: jid})
	g.log.Info("paired", "jid", logging.MaskJID(jid), "platform", e.Platform)
}
