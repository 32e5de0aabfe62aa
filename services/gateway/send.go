package gateway

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/types"
)

// ParseRecipient reads the "to" of P.msg.send: a phone number in
// international form (digits; a leading + and spaces or dashes are
// tolerated) or a JID of a user, LID, group or newsletter.
func ParseRecipient(to string) (types.JID, error) {
	s := strings.TrimSpace(to)
	if !strings.Contains(s, "@") {
		digits := strings.NewReplacer(" ", "", "-", "").Replace(strings.TrimPrefix(s, "+"))
		if len(digits) < 7 || len(digits) > 15 || strings.HasPrefix(digits, "0") || !allDigits(digits) {
			return types.JID{}, errUnknownRecipient
		}
		return types.NewJID(digits, types.DefaultUserServer), nil
	}
	jid, err := types.ParseJID(s)
	if err != nil || jid.User == "" || strings.ContainsAny(jid.User, "@ ") {
		return types.JID{}, errUnknownRecipient
	}
	switch jid.Server {
	case types.DefaultUserServer, types.HiddenUserServer:
		if !allDigits(jid.User) {
			return types.JID{}, errUnknownRecipient
		}
	case types.GroupServer:
		if !allDigits(strings.ReplaceAll(jid.User, "-", "")) {
			return types.JID{}, errUnknownRecipient
		}
	case types.NewsletterServer:
		if !allDigits(jid.User) {
			return types.JID{}, errUnknownRecipient
		}
	default:
		return types.JID{}, errUnknownRecipient
	}
	return jid.ToNonAD(), nil
}

var errUnknownRecipient = errors.New(`unknown recipient form: want a phone number with country code (digits) or a JID such as 15551234567@s.whatsapp.net or 123456789-987654@g.us`)

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// onSend serves P.msg.send. Cheap checks answer at once; the send itself
// (and any wait for its SEND_RATE slot, at most SendWait) runs on its own
// goroutine so one slow send does not queue the others.
func (g *Gateway) onSend(m *nats.Msg) {
	fail := func(msg string) { g.respond(m, bus.MsgSendReply{OK: false, Error: msg}) }
	req, err := bus.DecodeMsgSend(m.Data)
	if err != nil {
		fail(err.Error())
		return
	}
	to, err := ParseRecipient(req.To)
	if err != nil {
		fail(err.Error())
		return
	}
	g.sendMu.Lock()
	if !g.accepting {
		g.sendMu.Unlock()
		fail(errShuttingDown)
		return
	}
	g.sends.Add(1)
	base, stopping := g.sendBase, g.stopping
	g.sendMu.Unlock()
	done := g.sends.Done
	conn := g.liveConn()
	if conn == nil {
		done()
		fail("not connected to WhatsApp (state: " + g.State() + ")")
		return
	}
	now := g.clock.Now()
	r := g.limiter.ReserveN(now, 1)
	wait := r.DelayFrom(now)
	switch {
	case !r.OK():
		done()
		fail("rate limited by SEND_RATE")
		return
	case wait > g.cfg.SendWait:
		r.CancelAt(now)
		done()
		fail(fmt.Sprintf("rate limited: next send slot in %ds", int64(math.Ceil(wait.Seconds()))))
		return
	case wait > 0 && g.waiters.Add(1) > MaxSendWaiters:
		g.waiters.Add(-1)
		r.CancelAt(now)
		done()
		fail(fmt.Sprintf("rate limited: %d sends already waiting for a slot", MaxSendWaiters))
		return
	}
	go func() {
		defer done()
		if wait > 0 {
			ok := g.sleepUntil(now.Add(wait), stopping)
			g.waiters.Add(-1)
			if !ok {
				r.CancelAt(g.clock.Now())
				fail(errShuttingDown)
				return
			}
			if conn = g.liveConn(); conn == nil {
				fail("not connected to WhatsApp (state: " + g.State() + ")")
				return
			}
		}
		ctx, cancel := context.WithTimeout(base, g.cfg.SendTimeout)
		defer cancel()
		sent, err := conn.SendText(ctx, to, req.Text)
		if err != nil {
			g.log.Warn("msg.send failed", "err", err)
			fail("send failed: " + err.Error())
			return
		}
		ts := sent.Timestamp.UTC()
		g.respond(m, bus.MsgSendReply{OK: true, ID: sent.ID, Timestamp: &ts})
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
		g.log.Debug("msg.send not answered", "err", err)
	case err != nil:
		g.log.Warn("answer msg.send", "err", err)
	}
}
