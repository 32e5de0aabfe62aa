// Package recipient reads the "to" of a send: the one rule relay checks a
// P.msg.send against when it queues it (a bad recipient is refused at once,
// not queued to fail later) and the gateway applies when it sends.
package recipient

import (
	"errors"
	"strings"

	"go.mau.fi/whatsmeow/types"
)

// Parse reads the "to" of P.msg.send (and P.gateway.send): a phone number
// in international form (digits; a leading + and spaces or dashes are
// tolerated) or a JID of a user, LID, group or newsletter.
func Parse(to string) (types.JID, error) {
	s := strings.TrimSpace(to)
	if !strings.Contains(s, "@") {
		digits := strings.NewReplacer(" ", "", "-", "").Replace(strings.TrimPrefix(s, "+"))
		if len(digits) < 7 || len(digits) > 15 || strings.HasPrefix(digits, "0") || !allDigits(digits) {
			return types.JID{}, ErrUnknown
		}
		return types.NewJID(digits, types.DefaultUserServer), nil
	}
	jid, err := types.ParseJID(s)
	if err != nil || jid.User == "" || strings.ContainsAny(jid.User, "@ ") {
		return types.JID{}, ErrUnknown
	}
	switch jid.Server {
	case types.DefaultUserServer, types.HiddenUserServer:
		if !allDigits(jid.User) {
			return types.JID{}, ErrUnknown
		}
	case types.GroupServer:
		if !allDigits(strings.ReplaceAll(jid.User, "-", "")) {
			return types.JID{}, ErrUnknown
		}
	case types.NewsletterServer:
		if !allDigits(jid.User) {
			return types.JID{}, ErrUnknown
		}
	default:
		return types.JID{}, ErrUnknown
	}
	return jid.ToNonAD(), nil
}

// ErrUnknown is a "to" in none of the forms Parse reads.
var ErrUnknown = errors.New(`unknown recipient form: want a phone number with country code (digits) or a JID such as 15551234567@s.whatsapp.net or 123456789-987654@g.us`)

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
