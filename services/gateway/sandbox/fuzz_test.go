package sandbox

import (
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// FuzzInjectToEvent: whatever P.sandbox.inject carries, the chain from the
// bus decoder through Validate to the whatsmeow event never panics, and an
// accepted inject always makes an event of its type.
func FuzzInjectToEvent(f *testing.F) {
	for _, s := range []string{
		`{"from":"1234567","text":"hi"}`,
		`{"from":"1234567","type":"poll","text":"q","options":["a","b"]}`,
		`{"from":"1234567","type":"location","latitude":1,"longitude":2}`,
		`{"from":"1234567","type":"reaction","target":"X","text":"👍","group":"1-2"}`,
		`{"from":"1234567","type":"document"}`, `{"from":"1234567","type":"revoke"}`, `{}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := bus.DecodeSandboxInject(data)
		if err != nil {
			return
		}
		in := Inject{From: req.From, PushName: req.PushName, Group: req.Group, Type: req.Type, Count: req.Count, Rate: req.Rate,
			Content: Content{Text: req.Text, FileName: req.FileName, Target: req.Target, Options: req.Options}}
		if req.Latitude != nil && req.Longitude != nil {
			in.HasLocation, in.Latitude, in.Longitude = true, *req.Latitude, *req.Longitude
		}
		if err := in.Validate(); err != nil {
			if !IsBadRequest(err) {
				t.Fatalf("validate %q: %v is not a bad request", data, err)
			}
			return
		}
		chat := in.From + "@s.whatsapp.net"
		if in.Group != "" {
			chat = in.Group + "@g.us"
		}
		evt, err := buildMessage(&pending{id: "ABC", chat: chat, sender: in.From + "@s.whatsapp.net", pushName: in.PushName,
			typ: in.Type, body: in.Content, sentAt: time.Unix(1_700_000_000, 0)})
		if err != nil || evt == nil || evt.Message == nil {
			t.Fatalf("accepted %q but built no event: %v", data, err)
		}
	})
}
