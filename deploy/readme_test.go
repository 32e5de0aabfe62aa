package deploy

import (
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestReadmeLayoutListsEveryPackage: the README's layout block names every
// directory that holds Go code, so a new package cannot go unexplained.
func TestReadmeLayoutListsEveryPackage(t *testing.T) {
	readme := string(readFile(t, "README.md"))
	start := strings.Index(readme, "## Layout")
	if start < 0 {
		t.Fatal("README.md has no Layout section")
	}
	section := readme[start:]
	if end := strings.Index(section[len("## Layout"):], "\n## "); end >= 0 {
		section = section[:len("## Layout")+end]
	}
	listed := map[string]bool{}
	for _, line := range strings.Split(section, "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasSuffix(f[0], "/") {
			listed[strings.TrimSuffix(f[0], "/")] = true
		}
	}

	var dirs []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() && path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "node_modules") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(name, ".go") {
			return nil
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		if rel = filepath.ToSlash(rel); !slices.Contains(dirs, rel) {
			dirs = append(dirs, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) < 15 {
		t.Fatalf("found only %d Go directories: %v", len(dirs), dirs)
	}
	for _, d := range dirs {
		if !listed[d] {
			t.Errorf("README.md layout does not list %s/", d)
		}
	}
	for d := range listed {
		if !slices.Contains(dirs, d) {
			t.Errorf("README.md layout lists %s/, which holds no Go code", d)
		}
	}
}
