package backup

import (
	"context"
	"os"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/incr"
)

// The watching half of continuous replication: an incr.Watcher on the
// store notices commits (PRAGMA data_version), and the pipeline marks what
// each point covers on it, which gives the replication lag.

// watchRecheck is how often RunWatcher checks that the store it watches is
// still the file at the session path (a restore renames a new one in).
const watchRecheck = time.Second

func (p *Incremental) watcher() *incr.Watcher {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.watch
}

// Lag is the age of the oldest commit noticed and not yet in the database
// (zero: none, or nothing watched).
func (p *Incremental) Lag() time.Duration {
	if w := p.watcher(); w != nil {
		return w.Lag()
	}
	return 0
}

// RunWatcher watches the store until ctx ends and calls changed after one or
// more commits. It waits for the store to exist and follows it when a
// restore replaces the file. The caller owns the goroutine.
func (p *Incremental) RunWatcher(ctx context.Context, poll time.Duration, changed func()) {
	clock := p.cfg.Clock
	for ctx.Err() == nil {
		fi, err := os.Stat(p.cfg.SessionPath)
		var w *incr.Watcher
		if err == nil {
			w, err = incr.NewWatcher(ctx, p.cfg.SessionPath, incr.WatcherOptions{Interval: poll, Clock: clock, Log: p.cfg.Log})
		}
		if err != nil {
			select {
			case <-ctx.Done():
				return
			case <-clock.After(watchRecheck):
			}
			continue
		}
		p.watchFile(ctx, w, fi, changed)
	}
}

// watchFile runs w until ctx ends or the session path names another file.
func (p *Incremental) watchFile(ctx context.Context, w *incr.Watcher, fi os.FileInfo, changed func()) {
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = w.Run(wctx) })
	p.mu.Lock()
	p.watch = w
	p.mu.Unlock()
	defer func() {
		stop()
		wg.Wait()
		p.mu.Lock()
		p.watch = nil
		p.mu.Unlock()
		_ = w.Close()
	}()
	changed() // commits before the watcher opened are not reported: cover them
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.Changes():
			changed()
		case <-p.cfg.Clock.After(watchRecheck):
			if now, err := os.Stat(p.cfg.SessionPath); err != nil || !os.SameFile(now, fi) {
				return
			}
		}
	}
}
