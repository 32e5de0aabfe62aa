package main

import (
	"context"
	"regexp"
	"strings"
	"testing"
)

// The top-level help names every flag restore and snapshots take, and says
// that points are listed and restored too.
func TestHelpNamesEveryRestoreFlagAndPoints(t *testing.T) {
	_, stdout, stderr := runMain(t, context.Background(), nil, "restore", "-h")
	out := stdout + stderr
	flags := regexp.MustCompile(`(?m)^\s+-(\S+)`).FindAllStringSubmatch(out, -1)
	if len(flags) < 4 {
		t.Fatalf("restore -h printed %d flags:\n%s", len(flags), out)
	}
	line := func(cmd string) string {
		for l := range strings.Lines(usage()) {
			if strings.HasPrefix(strings.TrimSpace(l), cmd+" ") {
				return l
			}
		}
		t.Fatalf("usage lacks %s:\n%s", cmd, usage())
		return ""
	}
	restore := line("restore")
	for _, f := range flags {
		if !strings.Contains(restore, "--"+f[1]) {
			t.Errorf("usage's restore line %q lacks --%s", restore, f[1])
		}
	}
	if !strings.Contains(restore, "pN") || !strings.Contains(restore, "point") {
		t.Errorf("usage's restore line %q does not say a point (pN) can be restored", restore)
	}
	if s := line("snapshots"); !strings.Contains(s, "points") {
		t.Errorf("usage's snapshots line %q does not say points are listed", s)
	}
}
