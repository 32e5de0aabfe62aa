package postgres

import (
	"net/url"
	"testing"
)

func TestWithSSLMode(t *testing.T) {
	for _, tc := range []struct {
		in     string
		heroku bool
		want   string // sslmode after
	}{
		{"postgres://u:p@h:5432/d", true, "require"},
		{"postgres://u:p@h:5432/d?sslmode=disable", true, "disable"},
		{"postgres://u:p@h:5432/d?sslmode=verify-full", true, "verify-full"},
		{"postgres://u:p@h:5432/d", false, ""},
	} {
		got, err := withSSLMode(tc.in, tc.heroku)
		if err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		u, _ := url.Parse(got)
		if m := u.Query().Get("sslmode"); m != tc.want {
			t.Errorf("%s heroku=%v: sslmode %q; want %q", tc.in, tc.heroku, m, tc.want)
		}
		if u.User.String() != "u:p" {
			t.Errorf("%s: user info changed to %q", tc.in, u.User.String())
		}
	}
}
