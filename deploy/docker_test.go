package deploy

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	Cmd  string // upper case: FROM, RUN, ...
	Args string
}

func dockerfile(t *testing.T) []instruction {
	t.Helper()
	var out []instruction
	var cur strings.Builder
	for _, line := range strings.Split(string(readFile(t, "Dockerfile")), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasPrefix(trimmed, "#") { // a comment inside a continuation
			continue
		}
		if body, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{Cmd: strings.ToUpper(cmd), Args: strings.Join(strings.Fields(args), " ")})
		cur.Reset()
	}
	if cur.Len() > 0 {
		t.Fatal("Dockerfile ends inside a continuation line")
	}
	return out
}

// stages splits the instructions at each FROM.
func stages(ins []instruction) [][]instruction {
	var out [][]instruction
	for _, in := range ins {
		if in.Cmd == "FROM" {
			out = append(out, nil)
		}
		if len(out) > 0 {
			out[len(out)-1] = append(out[len(out)-1], in)
		}
	}
	return out
}

func find(st []instruction, cmd string) []instruction {
	var out []instruction
	for _, in := range st {
		if in.Cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

func TestDockerfile(t *testing.T) {
	st := stages(dockerfile(t))
	if len(st) != 2 {
		t.Fatalf("Dockerfile has %d stages, want 2 (build, runtime)", len(st))
	}
	build, runtime := st[0], st[1]

	// The builder's Go is the go.mod's: an older one refuses the module.
	var goVersion string
	for _, line := range strings.Split(string(readFile(t, "go.mod")), "\n") {
		if v, ok := strings.CutPrefix(line, "go "); ok {
			goVersion = strings.TrimSpace(v)
		}
	}
	parts := strings.Split(goVersion, ".")
	if len(parts) < 2 {
		t.Fatalf("go.mod go directive %q", goVersion)
	}
	wantFrom := "golang:" + parts[0] + "." + parts[1]
	if from := build[0].Args; !strings.HasPrefix(from, wantFrom+" ") || !strings.HasSuffix(from, " AS build") {
		t.Errorf("build stage FROM %q, want %s ... AS build (go.mod says go %s)", from, wantFrom, goVersion)
	}
	var goBuild string
	for _, r := range find(build, "RUN") {
		if strings.Contains(r.Args, "go build") {
			goBuild = r.Args
		}
	}
	for _, want := range []string{"CGO_ENABLED=0", "-X main.version=", "-X main.commit=", "./cmd/blacksky", "-o /out/blacksky"} {
		if !strings.Contains(goBuild, want) {
			t.Errorf("go build %q lacks %q", goBuild, want)
		}
	}

	// The runtime stage copies the binary, drops root, and runs `blacksky run`.
	if !slices.ContainsFunc(find(runtime, "COPY"), func(in instruction) bool {
		return strings.Contains(in.Args, "--from=build") && strings.Contains(in.Args, "/out/blacksky /usr/local/bin/blacksky")
	}) {
		t.Error("runtime stage does not copy the binary to /usr/local/bin/blacksky")
	}
	users := find(runtime, "USER")
	if len(users) == 0 || slices.Contains([]string{"root", "0", "0:0"}, users[len(users)-1].Args) {
		t.Errorf("runtime USER = %v, want a non-root user", users)
	}
	if hc := find(runtime, "HEALTHCHECK"); len(hc) != 1 || !strings.HasSuffix(hc[0].Args, `CMD ["blacksky", "healthcheck"]`) {
		t.Errorf("HEALTHCHECK = %v, want exec form of blacksky healthcheck", hc)
	}
	if cmd := find(runtime, "CMD"); len(cmd) != 1 || cmd[0].Args != `["blacksky", "run"]` {
		t.Errorf("CMD = %v, want [\"blacksky\", \"run\"] (exec form: SIGTERM reaches the binary)", cmd)
	}
	if ep := find(runtime, "ENTRYPOINT"); len(ep) != 0 {
		t.Errorf("ENTRYPOINT %v: Heroku and compose pass whole commands (blacksky gateway), so there must be none", ep)
	}
	env := strings.Join(argsOf(find(runtime, "ENV")), " ")
	if !strings.Contains(env, "DATA_DIR=/data") {
		t.Errorf("ENV %q does not set DATA_DIR=/data, the compose volume and app.json's DATA_DIR", env)
	}
	if ComposeFixed["gateway"]["DATA_DIR"] != "/data" || HerokuValues["DATA_DIR"] != "/data" {
		t.Error("DATA_DIR differs between the Dockerfile, compose and app.json")
	}
	run := strings.Join(argsOf(find(runtime, "RUN")), " ")
	for _, want := range []string{"ca-certificates", "/data"} {
		if !strings.Contains(run, want) {
			t.Errorf("runtime RUN lacks %q (TLS to WhatsApp and Postgres needs CA roots; /data must exist for the user)", want)
		}
	}
}

func argsOf(ins []instruction) []string {
	var out []string
	for _, in := range ins {
		out = append(out, in.Args)
	}
	return out
}

// TestLinkerVariablesExist: the Dockerfile's -X flags name package-level
// string variables of cmd/blacksky; a renamed one would be silently ignored.
func TestLinkerVariablesExist(t *testing.T) {
	fset := token.NewFileSet()
	found := map[string]bool{}
	files, err := filepath.Glob(filepath.Join(root, "cmd/blacksky/*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("cmd/blacksky sources: %v", err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		if af.Name.Name != "main" {
			continue
		}
		for _, d := range af.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, spec := range gd.Specs {
				for _, n := range spec.(*ast.ValueSpec).Names {
					found[n.Name] = true
				}
			}
		}
	}
	for _, name := range []string{"version", "commit"} {
		if !found[name] {
			t.Errorf("cmd/blacksky has no package variable %s for -X main.%s", name, name)
		}
	}
}

// dockerignore reads .dockerignore's patterns.
func dockerignore(t *testing.T) (exclude, include []string) {
	t.Helper()
	for _, line := range strings.Split(string(readFile(t, ".dockerignore")), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if p, ok := strings.CutPrefix(line, "!"); ok {
			include = append(include, strings.TrimSuffix(p, "/"))
			continue
		}
		exclude = append(exclude, strings.TrimSuffix(line, "/"))
	}
	return exclude, include
}

// ignoreMatch reports whether pattern matches rel or one of its parent
// directories, the way Docker's matcher does for the patterns we use
// (a leading **/ matches any depth).
func ignoreMatch(pattern, rel string) bool {
	parts := strings.Split(rel, "/")
	for i := 1; i <= len(parts); i++ {
		prefix := strings.Join(parts[:i], "/")
		if ok, _ := filepath.Match(pattern, prefix); ok {
			return true
		}
		if sub, ok := strings.CutPrefix(pattern, "**/"); ok {
			for j := 0; j < i; j++ {
				if ok, _ := filepath.Match(sub, strings.Join(parts[j:i], "/")); ok {
					return true
				}
			}
		}
	}
	return false
}

func ignored(exclude, include []string, rel string) bool {
	out := false
	for _, p := range exclude {
		if ignoreMatch(p, rel) {
			out = true
		}
	}
	for _, p := range include {
		if ignoreMatch(p, rel) {
			out = false
		}
	}
	return out
}

// TestDockerignoreKeepsTheBuild: everything `go build ./cmd/blacksky`
// reads (go.mod, go.sum, non-test Go files, go:embed targets) reaches the
// build context, and local state and secrets do not.
func TestDockerignoreKeepsTheBuild(t *testing.T) {
	exclude, include := dockerignore(t)
	needed := []string{"go.mod", "go.sum"}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if rel == ".git" || rel == "deploy" || rel == "e2e" || strings.HasPrefix(d.Name(), ".") && rel != "." {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(rel, ".go") || strings.HasSuffix(rel, "_test.go") {
			return nil
		}
		needed = append(needed, rel)
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(src), "\n") {
			pats, ok := strings.CutPrefix(strings.TrimSpace(line), "//go:embed ")
			if !ok {
				continue
			}
			for _, p := range strings.Fields(pats) {
				matches, _ := filepath.Glob(filepath.Join(filepath.Dir(path), strings.TrimPrefix(p, "all:")))
				for _, m := range matches {
					r, _ := filepath.Rel(root, m)
					needed = append(needed, filepath.ToSlash(r))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, rel := range needed {
		if ignored(exclude, include, rel) {
			t.Errorf(".dockerignore drops %s, which the build needs", rel)
		}
	}
	for _, rel := range []string{".env", ".git/config", "data/session.db", "session.db", "cmd/blacksky/data/blacksky.db"} {
		if !ignored(exclude, include, rel) {
			t.Errorf(".dockerignore lets %s into the build context", rel)
		}
	}
	if ignored(exclude, include, ".env.example") {
		t.Error(".env.example is dropped; it should be the one .env* file kept")
	}
}

// TestStatesDocumented: docs/states.md has a row for every state the code
// can report (the State* string constants of shared/bus, the heartbeat
// states, and of services/health, the states health gives a service it has
// not heard from), so a new state cannot go unexplained.
func TestStatesDocumented(t *testing.T) {
	var states []string
	for _, dir := range []string{"shared/bus", "services/health"} {
		files, err := filepath.Glob(filepath.Join(root, dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			states = append(states, stateConsts(af)...)
		}
	}
	// Guard against a parser that finds nothing: every one the page must
	// explain today is among them.
	for _, must := range []string{"starting", "connected", "client_outdated", "ok", "degraded", "disconnected", "unknown"} {
		if !slices.Contains(states, must) {
			t.Fatalf("state %q not found among the constants %v", must, states)
		}
	}
	doc := string(readFile(t, "docs/states.md"))
	for _, s := range states {
		if !strings.Contains(doc, "| `"+s+"` |") {
			t.Errorf("docs/states.md has no row for state %q", s)
		}
	}
}

// stateConsts returns the values of the string constants named State* in af.
func stateConsts(af *ast.File) []string {
	var out []string
	for _, d := range af.Decls {
		gd, ok := d.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, spec := range gd.Specs {
			vs := spec.(*ast.ValueSpec)
			for i, n := range vs.Names {
				if !strings.HasPrefix(n.Name, "State") || i >= len(vs.Values) {
					continue
				}
				if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if v, err := strconv.Unquote(lit.Value); err == nil {
						out = append(out, v)
					}
				}
			}
		}
	}
	return out
}
