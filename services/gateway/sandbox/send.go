package sandbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/services/gateway"
	"go.mau.fi/whatsmeow"
	"go.mau.fi/whatsmeow/types"
)

// Refusals a send may meet when told to (fault send_not_on_whatsapp,
// send_rate_limited).
var (
	ErrNotOnWhatsApp = errors.New("the number is not on WhatsApp")
	errRateLimited   = fmt.Errorf("%w 429 (rate-overlimit)", whatsmeow.ErrServerReturnedError)
)

// SendText records the send in the server file (and tells OnSent), moves
// the store as sending does, and answers with an id and the server's
// timestamp, or refuses as WhatsApp would when a refusal is armed.
func (c *Client) SendText(ctx context.Context, to types.JID, text string) (gateway.Sent, error) {
	c.mu.Lock()
	s, dev := c.sock, c.dev
	loggedIn := s != nil && s.loggedIn && dev.ID != nil
	var own types.JID
	if loggedIn {
		own = *dev.ID
	}
	c.mu.Unlock()
	if !loggedIn {
		return gateway.Sent{}, fmt.Errorf("send message: %w", whatsmeow.ErrNotConnected)
	}
	if to.Server != types.DefaultUserServer && to.Server != types.GroupServer {
		return gateway.Sent{}, fmt.Errorf("send message: %w %s", whatsmeow.ErrUnknownServer, to.Server)
	}
	now := c.srv.clock.Now()
	if kind := c.srv.takeRefusal(); kind != "" {
		err := errRateLimited
		if kind == FaultSendNotOnWhatsApp {
			err = fmt.Errorf("%s: %w", to.User, ErrNotOnWhatsApp)
		}
		if rerr := c.srv.recordSent(ctx, Sent{To: to.String(), Text: text, Timestamp: now.UTC(), Refused: err.Error()}, types.EmptyJID); rerr != nil {
			c.log.Warn("sandbox: record refused send", "err", rerr)
		}
		return gateway.Sent{}, fmt.Errorf("send message: %w", err)
	}
	if to.Server == types.GroupServer {
		rec := c.srv.seed.bytes("sender-key", senderKeyBase)
		if err := dev.SenderKeys.PutSenderKey(ctx, to.String(), own.SignalAddress().String(), rec); err != nil {
			return gateway.Sent{}, fmt.Errorf("send message: store sender key: %w", err)
		}
	} else if err := c.session(ctx, dev, to, false); err != nil {
		return gateway.Sent{}, fmt.Errorf("send message: %w", err)
	}
	m := Sent{ID: c.srv.seed.outgoingID(), To: to.String(), Text: text, Timestamp: now.Truncate(time.Second).UTC()}
	if err := c.srv.recordSent(ctx, m, own); err != nil {
		return gateway.Sent{}, fmt.Errorf("send message: %w", err)
	}
	return gateway.Sent{ID: m.ID, Timestamp: m.Timestamp}, nil
}
