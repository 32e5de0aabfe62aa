package gateway

import (
	"context"
	"errors"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/recipient"
	"github.com/nats-io/nats.go"
)

// onSend serves P.gateway.send: relay asks for one message to go out now.
// Cheap checks answer at once; the send itself runs on its own goroutine
// so one slow send does not queue the others.
//
// A key sent before is answered from memory, not sent again, and a repeat
// of a key still sending waits for it (sentKeys): that is what closes the
// double-send window when relay dies between the send and its commit.
//
// SEND_RATE is relay's to keep: it paces its queue by it, and a send it
// released must not be refused or held here by a second limiter that can
// only disagree with it (two buckets started at different times). The
// gateway's limiter stays for what the gateway sends on its own (owner
// replies and alerts): each relay send takes a token from it without
// waiting, so an owner reply waits its turn behind them instead of
// doubling the rate.
func (g *Gateway) onSend(m *nats.Msg) {
	fail := func(msg string) { g.respond(m, bus.MsgSendReply{OK: false, Error: msg}) }
	req, err := bus.DecodeMsgSend(m.Data)
	if err != nil {
		fail(err.Error())
		return
	}
	to, err := recipient.Parse(req.To)
	if err != nil {
		fail(err.Error())
		return
	}
	call, state := g.sent.begin(req.IdempotencyKey)
	if state == callDone {
		g.log.Info("gateway.send repeated; answered with its first outcome, not sent again", "idempotency_key", call.key)
		g.respond(m, call.rep)
		return
	}
	// Whoever began the call must finish it, or its repeats wait forever.
	refuse := func(msg string) {
		rep := bus.MsgSendReply{OK: false, Error: msg}
		if state == callNew {
			g.sent.finish(call, rep)
		}
		g.respond(m, rep)
	}
	g.sendMu.Lock()
	if !g.accepting {
		g.sendMu.Unlock()
		refuse(errShuttingDown)
		return
	}
	g.sends.Add(1)
	base := g.sendBase
	g.sendMu.Unlock()
	if state == callRunning {
		go func() {
			defer g.sends.Done()
			<-call.done // the first request's send ends within SendTimeout
			g.respond(m, call.rep)
		}()
		return
	}
	conn := g.liveConn()
	if conn == nil {
		g.sends.Done()
		refuse("not connected to WhatsApp (state: " + g.State() + ")")
		return
	}
	g.limiter.ReserveN(g.clock.Now(), 1) // counted, never waited for: see above
	go func() {
		defer g.sends.Done()
		ctx, cancel := context.WithTimeout(base, g.cfg.SendTimeout)
		defer cancel()
		sent, err := conn.SendText(ctx, to, req.Text)
		if err != nil {
			g.log.Warn("gateway.send failed", "err", err)
			refuse("send failed: " + err.Error())
			return
		}
		ts := sent.Timestamp.UTC()
		rep := bus.MsgSendReply{OK: true, ID: sent.ID, Timestamp: &ts}
		g.sent.finish(call, rep)
		g.respond(m, rep)
	}()
}

const errShuttingDown = "shutting down: not sending; try again once the gateway is back"

// sleepUntil waits until at on the injected clock (at once if that has
// passed); false if stop closes first.
func (g *Gateway) sleepUntil(at time.Time, stop <-chan struct{}) bool {
	t := g.clock.NewTimer(g.clock.Until(at))
	defer t.Stop()
	select {
	case <-t.Chan():
		return true
	case <-stop:
		return false
	}
}

func (g *Gateway) respond(m *nats.Msg, r bus.MsgSendReply) {
	if m.Reply == "" {
		return // a plain publish: nobody to answer
	}
	switch err := bus.Respond(m, r); {
	case errors.Is(err, bus.ErrReplySubject):
		g.log.Debug("gateway.send not answered", "err", err)
	case err != nil:
		g.log.Warn("answer gateway.send", "err", err)
	}
}
