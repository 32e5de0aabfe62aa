package deploy

import (
	"go/build"
	"maps"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v4"
)

// procfile parses a Procfile as Heroku does: one `type: command` per line.
func procfile(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for i, line := range strings.Split(string(readFile(t, "Procfile")), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		name, cmd, ok := strings.Cut(line, ":")
		if !ok || !regexp.MustCompile(`^[a-zA-Z0-9_-]+$`).MatchString(name) {
			t.Fatalf("Procfile line %d: %q is not `type: command`", i+1, line)
		}
		if _, dup := out[name]; dup {
			t.Fatalf("Procfile line %d: process type %s declared twice", i+1, name)
		}
		out[name] = strings.TrimSpace(cmd)
	}
	return out
}

// TestProcfile: the Go buildpack path runs the same processes as heroku.yml
// (web: blacksky run, release: blacksky migrate), with gateway and backup in
// one process on one dyno.
func TestProcfile(t *testing.T) {
	p := procfile(t)
	if got := slices.Sorted(maps.Keys(p)); !slices.Equal(got, []string{"release", "web"}) {
		t.Errorf("Procfile process types = %v, want release and web", got)
	}
	checkBlackskyCommand(t, "Procfile web", p["web"], "blacksky run")
	checkBlackskyCommand(t, "Procfile release", p["release"], "blacksky migrate")

	run := map[string]yaml.Node{}
	for name, cmd := range p {
		if name != "release" {
			run[name] = yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: cmd}
		}
	}
	checkSameDyno(t, "Procfile", run)

	// The container path runs the same commands.
	var m herokuManifest
	if err := yaml.Unmarshal(readFile(t, "heroku.yml"), &m); err != nil {
		t.Fatalf("heroku.yml: %v", err)
	}
	if web, ok := m.Run["web"]; !ok || runCommand(t, web) != p["web"] {
		t.Errorf("Procfile web %q differs from heroku.yml run.web", p["web"])
	}
	if len(m.Release.Command) != 1 || m.Release.Command[0] != p["release"] {
		t.Errorf("Procfile release %q differs from heroku.yml release %v", p["release"], m.Release.Command)
	}
}

// TestGoModHerokuDirectives: the buildpack installs exactly the binary the
// Procfile runs, with the Go release go.mod asks for.
func TestGoModHerokuDirectives(t *testing.T) {
	mod := string(readFile(t, "go.mod"))
	install := regexp.MustCompile(`(?m)^// \+heroku install (.+)$`).FindAllStringSubmatch(mod, -1)
	if len(install) != 1 || strings.TrimSpace(install[0][1]) != "./cmd/blacksky" {
		t.Fatalf("go.mod: want one `// +heroku install ./cmd/blacksky` line, got %v", install)
	}
	pkg, err := build.ImportDir(filepath.Join(root, "cmd/blacksky"), 0)
	if err != nil || pkg.Name != "main" || filepath.Base(pkg.Dir) != "blacksky" {
		t.Fatalf("./cmd/blacksky is not the main package named blacksky: %v", err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\d+)\.(\d+)`).FindStringSubmatch(mod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	ver := regexp.MustCompile(`(?m)^// \+heroku goVersion (.+)$`).FindStringSubmatch(mod)
	if ver == nil {
		return // the buildpack then reads the go line
	}
	if want := "go" + goLine[1] + "." + goLine[2]; strings.TrimSpace(ver[1]) != want {
		t.Errorf("go.mod: +heroku goVersion %q, want %q to match the go line", ver[1], want)
	}
}
