package logging

import (
	"regexp"
	"strings"
)

// MaskJID shows enough of a WhatsApp JID (or phone number) for an operator
// to recognise the linked number, never the whole of it:
// "15551234567:12@s.whatsapp.net" gives "1555****567". The device suffix and
// server are dropped. Logs and /status both show JIDs this way.
func MaskJID(jid string) string {
	user, _, _ := strings.Cut(jid, "@")
	user, _, _ = strings.Cut(user, ":") // device number
	user, _, _ = strings.Cut(user, ".") // agent (old form user.agent:device)
	switch n := len(user); {
	case n == 0:
		return ""
	case n >= 9:
		return user[:4] + "****" + user[n-3:]
	case n >= 5:
		return user[:2] + "****" + user[n-2:]
	default:
		return "****"
	}
}

// jidInText finds user JIDs in free text: digits, an optional agent and
// device, and a user server (phone numbers and LIDs).
var jidInText = regexp.MustCompile(`\b\d{5,}(?:\.\d+)?(?::\d+)?@(?:s\.whatsapp\.net|c\.us|lid)\b`)

// MaskJIDs masks every user JID in text, for log lines written by code that
// does not mask them itself (whatsmeow's).
func MaskJIDs(text string) string {
	if !strings.Contains(text, "@") {
		return text
	}
	return jidInText.ReplaceAllStringFunc(text, func(jid string) string {
		_, server, _ := strings.Cut(jid, "@")
		return MaskJID(jid) + "@" + server
	})
}
