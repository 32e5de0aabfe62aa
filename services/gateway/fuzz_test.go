package gateway

import (
	"encoding/json"
	"testing"
	"unicode/utf8"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/recipient"
)

// FuzzMsgSend feeds P.msg.send bodies through the decoder and the recipient
// parser: no panic, and whatever is accepted is a well-formed request whose
// recipient survives a round trip.
func FuzzMsgSend(f *testing.F) {
	for _, seed := range []string{
		`{"to":"15551234567","text":"hi"}`,
		`{"to":"+1 555 123 4567","text":"hi"}`,
		`{"to":"120363025246125486@g.us","text":"x"}`,
		`{"to":"1:2@s.whatsapp.net","text":"x"}`,
		`{"to":"a.b:c@lid","text":"x"}`,
		`{"to":"","text":""}`,
		`{"to":"1","text":"x","extra":1}`,
		`{"to":"1"} {}`,
		`[1,2]`, `null`, ``, `{`, `{"to":1}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := bus.DecodeMsgSend(data)
		if err != nil {
			return
		}
		if req.To == "" || req.Text == "" || len(req.Text) > bus.MaxTextLen {
			t.Fatalf("decoder accepted %q as %+v", data, req)
		}
		jid, err := recipient.Parse(req.To)
		if err != nil {
			return
		}
		if jid.User == "" || jid.Device != 0 || !utf8.ValidString(jid.String()) {
			t.Fatalf("recipient %q parsed as %#v", req.To, jid)
		}
		again, err := recipient.Parse(jid.String())
		if err != nil || again != jid {
			t.Fatalf("recipient %q -> %s does not round-trip: %v, %v", req.To, jid, again, err)
		}
	})
}

// FuzzRelayBeat feeds P.heartbeat.relay bodies to the gateway's reader: no
// panic, and only a relay heartbeat with details is taken.
func FuzzRelayBeat(f *testing.F) {
	for _, seed := range []string{
		`{"service":"relay","instance":"a","state":"ok","uptime_s":1,"details":{"database":"postgres","database_ok":true}}`,
		`{"service":"relay","details":{"database_ok":false,"extra":1}}`,
		`{"service":"gateway","details":{"database_ok":true}}`,
		`{"service":"relay"}`, `{"service":"relay","details":[1]}`, `{"service":"relay","details":null}`,
		`null`, ``, `{`, `[]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ok, err := decodeRelayBeat(data)
		if err != nil {
			if ok {
				t.Fatalf("%q: database_ok with an error", data)
			}
			return
		}
		var hb bus.Heartbeat
		if json.Unmarshal(data, &hb) != nil || hb.Service != bus.ServiceRelay {
			t.Fatalf("accepted %q, not a relay heartbeat", data)
		}
	})
}
