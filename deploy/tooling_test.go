package deploy

import (
	"regexp"
	"strings"
	"testing"
)

// TestLintNeedsNothingInstalled: `make lint` runs staticcheck as a tool of
// the module (pinned in go.mod and go.sum), so a fresh clone with Go alone
// can run it, and CI uses the same instead of installing its own.
func TestLintNeedsNothingInstalled(t *testing.T) {
	mod := string(readFile(t, "go.mod"))
	if !regexp.MustCompile(`(?m)^tool honnef\.co/go/tools/cmd/staticcheck$`).MatchString(mod) {
		t.Error("go.mod: staticcheck is not a tool of the module (go get -tool honnef.co/go/tools/cmd/staticcheck@vX)")
	}
	if !regexp.MustCompile(`(?m)^\thonnef\.co/go/tools v\d+\.\d+\.\d+`).MatchString(mod) {
		t.Error("go.mod: honnef.co/go/tools is not pinned to a release")
	}
	makefile := string(readFile(t, "Makefile"))
	if !regexp.MustCompile(`(?m)^STATICCHECK \?= \$\(GO\) tool staticcheck$`).MatchString(makefile) ||
		!strings.Contains(makefile, "\t$(STATICCHECK) $(PKGS)") {
		t.Error("Makefile: lint should run `$(GO) tool staticcheck`")
	}
	ci := string(readFile(t, ".ci/run"))
	if strings.Contains(ci, "go install honnef.co") || !strings.Contains(ci, "make lint") {
		t.Error(".ci/run should run make lint, with the module's staticcheck, not install its own")
	}
}
