//go:build race

package e2e

// raceEnabled: the test runs under -race, so the processes are built with
// it too. That shares the build cache of `go test -race ./...` and lets the
// race detector watch the real processes.
const raceEnabled = true
