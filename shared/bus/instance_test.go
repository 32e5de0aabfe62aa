package bus_test

import (
	"strings"
	"testing"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// FuzzInstanceToken: whatever an instance id is made from (a DYNO name, a
// HOSTNAME, a file in DATA_DIR), its token is one subject-safe NATS token
// that CheckInstance accepts, and a valid id is its own token.
func FuzzInstanceToken(f *testing.F) {
	for _, s := range []string{"web.1-ab12cd34", "host-run-42-00ff", "i-0123456789abcdef", "", "a b*c>d", "ünïcode", strings.Repeat("x", 200), "a.b.c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		tok := bus.InstanceToken(id)
		if tok == "" {
			if id != "" {
				t.Fatalf("%q has an empty token", id)
			}
			return
		}
		if err := bus.CheckInstance(tok); err != nil {
			t.Fatalf("token %q of %q refused: %v", tok, id, err)
		}
		subj := bus.NewSubjects("S").SessionRestoreFor(tok)
		if got := strings.Count(subj, "."); got != 4 || strings.ContainsAny(subj, " *>\t\r\n") {
			t.Fatalf("subject %q for %q is not one extra token", subj, id)
		}
		if bus.CheckInstance(id) == nil && tok != id {
			t.Fatalf("valid id %q has token %q", id, tok)
		}
	})
}
