// Package testlog is how tests read what was logged: a buffer that the
// goroutines of a service write and the test reads at the same time, and a
// text logger writing to it. One helper for every package.
package testlog

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
)

// Buffer collects log lines (or any output) from several goroutines; its
// zero value is ready to use.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write implements io.Writer.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Count is how many times s was written so far.
func (b *Buffer) Count(s string) int { return strings.Count(b.String(), s) }

// Lines are the lines written so far that contain s ("level=ERROR", say).
func (b *Buffer) Lines(s string) []string {
	var out []string
	for line := range strings.Lines(b.String()) {
		if strings.Contains(line, s) {
			out = append(out, strings.TrimSuffix(line, "\n"))
		}
	}
	return out
}

// Logger is a text logger at info and above writing to b.
func (b *Buffer) Logger() *slog.Logger { return slog.New(slog.NewTextHandler(b, nil)) }

// New is a logger at info and above and the buffer it writes to.
func New() (*slog.Logger, *Buffer) {
	b := &Buffer{}
	return b.Logger(), b
}
