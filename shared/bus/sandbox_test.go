package bus_test

import (
	"math"
	"strings"
	"testing"

	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestSandboxDecodersRefuseBadInputWithTheReason(t *testing.T) {
	for _, c := range []struct {
		name, body, want string
		decode           func([]byte) error
	}{
		{"inject without from", `{"text":"x"}`, `"from"`, inject},
		{"inject letters in from", `{"from":"12ab567"}`, `"from"`, inject},
		{"inject unknown field", `{"from":"1234567","colour":"red"}`, "unknown field", inject},
		{"inject count too big", `{"from":"1234567","count":100001}`, `"count"`, inject},
		{"inject negative rate", `{"from":"1234567","rate":-1}`, `"rate"`, inject},
		{"inject bad group", `{"from":"1234567","group":"abc"}`, `"group"`, inject},
		{"inject latitude", `{"from":"1234567","latitude":91,"longitude":0}`, `"latitude"`, inject},
		{"fault without kind", `{}`, `"kind"`, fault},
		{"fault not an object", `"disconnect"`, "JSON object", fault},
		{"link bad phone", `{"phone":"+1 555"}`, `"phone"`, link},
		{"outbox limit", `{"limit":5000}`, `"limit"`, outbox},
		{"receipt without an id", `{"type":"read"}`, `"id"`, receipt},
		{"receipt with id and ids", `{"id":"A","ids":["B"],"type":"read"}`, "exactly one", receipt},
		{"receipt of an unknown type", `{"id":"A","type":"played"}`, `"type"`, receipt},
		{"receipt without a type", `{"id":"A"}`, `"type"`, receipt},
		{"receipt with an empty id among ids", `{"ids":["A",""],"type":"read"}`, `"id"`, receipt},
		{"receipt unknown field", `{"id":"A","type":"read","chat":"x"}`, "unknown field", receipt},
	} {
		err := c.decode([]byte(c.body))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %s", c.name, err, c.want)
		}
	}
	r, err := bus.DecodeSandboxInject([]byte(`{"from":"4915112345678","text":"hi"}`))
	if err != nil || r.Count != 1 {
		t.Errorf("minimal inject: %+v %v, want count 1", r, err)
	}
	if l, err := bus.DecodeSandboxLink(nil); err != nil || l.Phone != "" {
		t.Errorf("empty link body: %+v %v", l, err)
	}
	if r, err := bus.DecodeSandboxReceipt([]byte(`{"id":"3EB0AB","type":"delivered"}`)); err != nil || len(r.IDs) != 1 || r.IDs[0] != "3EB0AB" || r.ID != "" {
		t.Errorf("receipt of one id: %+v %v, want it in IDs", r, err)
	}
	if o, err := bus.DecodeSandboxOutbox(nil); err != nil || o.Limit != 20 {
		t.Errorf("empty outbox body: %+v %v", o, err)
	}
}

func inject(b []byte) error  { _, err := bus.DecodeSandboxInject(b); return err }
func fault(b []byte) error   { _, err := bus.DecodeSandboxFault(b); return err }
func link(b []byte) error    { _, err := bus.DecodeSandboxLink(b); return err }
func outbox(b []byte) error  { _, err := bus.DecodeSandboxOutbox(b); return err }
func receipt(b []byte) error { _, err := bus.DecodeSandboxReceipt(b); return err }

func FuzzSandboxDecoders(f *testing.F) {
	for _, s := range []string{"", "{}", `{"from":"1234567","text":"x","count":3,"rate":2.5}`,
		`{"kind":"temporary_ban","code":101,"expire":"1h"}`, `{"phone":"15551234567"}`, `{"limit":3}`,
		`{"from":"1234567","latitude":1e400}`, "[", "\x00", `{"from":"1234567"} {}`,
		`{"id":"3EB0AB","type":"read"}`, `{"ids":["A","B"],"type":"delivered"}`, `{"ids":[],"type":"read"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if r, err := bus.DecodeSandboxInject(data); err == nil {
			if r.Count < 1 || r.Count > bus.MaxSandboxCount || math.IsNaN(r.Rate) || r.Rate < 0 || len(r.From) < 5 {
				t.Fatalf("inject accepted %q as %+v", data, r)
			}
		}
		if r, err := bus.DecodeSandboxFault(data); err == nil && r.Kind == "" {
			t.Fatalf("fault accepted %q without a kind", data)
		}
		if r, err := bus.DecodeSandboxOutbox(data); err == nil && (r.Limit < 1 || r.Limit > bus.MaxSandboxLimit) {
			t.Fatalf("outbox accepted %q with limit %d", data, r.Limit)
		}
		if r, err := bus.DecodeSandboxReceipt(data); err == nil {
			if r.ID != "" || len(r.IDs) == 0 || len(r.IDs) > bus.MaxSandboxReceiptIDs || r.Type != "delivered" && r.Type != "read" {
				t.Fatalf("receipt accepted %q as %+v", data, r)
			}
			for _, id := range r.IDs {
				if id == "" || len(id) > bus.MaxIDLen {
					t.Fatalf("receipt accepted %q with id %q", data, id)
				}
			}
		}
		_, _ = bus.DecodeSandboxLink(data)
	})
}
