//go:build !race

package e2e

// raceEnabled: without -race the binary is built as the Dockerfile builds
// it, static with CGO_ENABLED=0.
const raceEnabled = false
