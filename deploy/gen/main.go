// Command gen writes the generated deploy files (.env.example, app.json,
// docs/environment.md) from shared/config.Vars; -check only compares.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/blacksky-md/blacksky/deploy"
)

func main() {
	root := flag.String("root", ".", "repository root")
	check := flag.Bool("check", false, "report files that differ instead of writing them")
	flag.Parse()
	if err := run(*root, *check); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(root string, check bool) error {
	stale := 0
	for _, g := range deploy.Generated {
		want, err := g.Render()
		if err != nil {
			return fmt.Errorf("render %s: %w", g.Path, err)
		}
		path := filepath.Join(root, g.Path)
		if check {
			got, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(got, want) {
				fmt.Fprintf(os.Stderr, "%s is stale: run go run ./deploy/gen\n", g.Path)
				stale++
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("write %s: %w", g.Path, err)
		}
		if err := os.WriteFile(path, want, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", g.Path, err)
		}
	}
	if stale > 0 {
		return fmt.Errorf("%d generated file(s) out of date", stale)
	}
	return nil
}
