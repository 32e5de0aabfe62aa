package recipient

import (
	"testing"
	"unicode/utf8"
)

func TestParseReadsPhoneNumbersAndJIDsAndRefusesTheRest(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means rejected
	}{
		{"15551234567", "15551234567@s.whatsapp.net"},
		{"+1 555 123-4567", "15551234567@s.whatsapp.net"},
		{"  447700900123 ", "447700900123@s.whatsapp.net"},
		{"15551234567@s.whatsapp.net", "15551234567@s.whatsapp.net"},
		{"15551234567:12@s.whatsapp.net", "15551234567@s.whatsapp.net"},
		{"123456789012345@lid", "123456789012345@lid"},
		{"120363025246125486@g.us", "120363025246125486@g.us"},
		{"15551234567-1600000000@g.us", "15551234567-1600000000@g.us"},
		{"120363144038483540@newsletter", "120363144038483540@newsletter"},
		{"", ""},
		{"123456", ""},               // too short
		{"1234567890123456", ""},     // too long
		{"0555123456", ""},           // national form
		{"abc", ""},                  // not digits
		{"alice@s.whatsapp.net", ""}, // user not a number
		{"15551234567@example.com", ""},
		{"status@broadcast", ""},
		{"@s.whatsapp.net", ""},
		{"1@2@s.whatsapp.net", ""},
		{"1.2.3@s.whatsapp.net", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			switch {
			case tt.want == "" && err == nil:
				t.Fatalf("Parse(%q) = %s, want an error", tt.in, got)
			case tt.want != "" && err != nil:
				t.Fatalf("Parse(%q): %v", tt.in, err)
			case tt.want != "" && got.String() != tt.want:
				t.Fatalf("Parse(%q) = %s, want %s", tt.in, got, tt.want)
			}
		})
	}
}

// FuzzParse: whatever Parse accepts is a JID without a device that parses
// back to itself.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{"15551234567", "+1 555 123-4567", "15551234567:12@s.whatsapp.net", "120363025246125486@g.us",
		"a.b:c@lid", "", "abc", "1@2@s.whatsapp.net", "15551234567-1600000000@g.us", "120363144038483540@newsletter"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, to string) {
		jid, err := Parse(to)
		if err != nil {
			return
		}
		if jid.User == "" || jid.Device != 0 || !utf8.ValidString(jid.String()) {
			t.Fatalf("recipient %q parsed as %#v", to, jid)
		}
		again, err := Parse(jid.String())
		if err != nil || again != jid {
			t.Fatalf("recipient %q -> %s does not round-trip: %v, %v", to, jid, again, err)
		}
	})
}
