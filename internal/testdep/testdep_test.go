package testdep_test

import (
	"testing"

	"github.com/blacksky-md/blacksky/internal/testdep"
)

// recorder is a testing.TB that records how a test ended instead of ending.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Helper()               {}
func (r *recorder) Fatal(args ...any)     { r.fatal = args[0].(string) }
func (r *recorder) Skip(args ...any)      { r.skip = args[0].(string) }
func (r *recorder) Fatalf(string, ...any) {}

func TestMissingFailsInCIAndSkipsElsewhere(t *testing.T) {
	t.Setenv("CI", "true")
	r := &recorder{TB: t}
	testdep.Missing(r, "no %s", "browser")
	if r.fatal == "" || r.skip != "" {
		t.Fatalf("CI=true: fatal %q, skip %q; want a failure", r.fatal, r.skip)
	}
	t.Setenv("CI", "")
	r = &recorder{TB: t}
	testdep.Missing(r, "no %s", "browser")
	if r.skip == "" || r.fatal != "" {
		t.Fatalf("without CI: fatal %q, skip %q; want a skip", r.fatal, r.skip)
	}
}
