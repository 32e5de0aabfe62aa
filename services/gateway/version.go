package gateway

import (
	"context"
	"fmt"
	"github.com/blacksky-md/blacksky/internal/clockctx"
)

// VersionSource is the WhatsApp web client version the Conn presents at
// login, and where WhatsApp's current one comes from (package wa: whatsmeow's
// GetLatestVersion and store.SetWAVersion).
type VersionSource interface {
	// Current is the version the next Connect presents, such as
	// "2.3000.1023456789".
	Current() string
	// Latest fetches the version WhatsApp's web client serves today.
	Latest(ctx context.Context) (string, error)
	// Use makes v the version every later Connect presents.
	Use(v string) error
}

// refreshVersion reacts to client_outdated (the socket is closed, the state
// is client_outdated): fetch WhatsApp's current web version and reconnect
// with it, at most once per VersionRefreshEvery. The fetched version being
// refused before it ever connected, or WhatsApp serving the very version it
// refuses, stops the retries until a newer build is deployed. A fetched
// version that did connect and is refused later, within the hour, is no
// reason to stop: WhatsApp moved on again, and the next fetch comes at the
// next allowed time. A failed or postponed fetch is tried again by
// reconnecting then: if WhatsApp still says outdated, the fetch runs.
//
// The fetch runs on the loop, bounded by VersionFetchTimeout: the socket is
// closed, so nothing waits on the loop but events, which queue meanwhile,
// and shutdown cancels the fetch through ctx.
func (g *Gateway) refreshVersion(ctx context.Context) {
	const update = "Update blacksky (a newer build carries a newer whatsmeow) and restart"
	if g.versions == nil {
		g.log.Error("WhatsApp rejects this client version; not retrying. " + update)
		return
	}
	now := g.clock.Now()
	cur := g.versions.Current()
	if !g.verTried.IsZero() && now.Sub(g.verTried) < VersionRefreshEvery {
		if !g.verConnected {
			g.log.Error("WhatsApp rejects this client version, fetched from WhatsApp within the hour, too; not retrying. "+update,
				"version", cur, "fetched_at", g.verTried)
			return
		}
		next := g.verTried.Add(VersionRefreshEvery)
		g.log.Warn("WhatsApp rejects the version fetched within the hour, after accepting it; fetching again at the next allowed time",
			"version", cur, "fetched_at", g.verTried, "next_fetch", next)
		g.scheduleRetry(next.Sub(now), false)
		return
	}
	g.verTried, g.verConnected = now, false
	g.log.Warn("WhatsApp rejects this client version; fetching the web version WhatsApp serves now", "version", cur)
	fctx, cancel := clockctx.WithTimeout(ctx, g.clock, VersionFetchTimeout)
	latest, err := g.versions.Latest(fctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	switch {
	case err != nil:
		g.log.Error("fetching WhatsApp's current web version failed; trying again later", "err", err, "retry_in", VersionRefreshEvery)
		g.scheduleRetry(VersionRefreshEvery, false)
		return
	case latest == cur:
		g.log.Error("WhatsApp rejects the web version it serves itself; not retrying. "+update, "version", cur)
		return
	}
	if err := g.versions.Use(latest); err != nil {
		g.log.Error("WhatsApp's current web version cannot be used; not retrying. "+update, "version", latest, "err", err)
		return
	}
	g.log.Warn("now presenting WhatsApp's current web version; reconnecting", "from", cur, "to", latest)
	g.verNote = fmt.Sprintf("WhatsApp said this client was outdated: it now presents WhatsApp's current web version %s (was %s). "+
		"Update blacksky when you can; if WhatsApp refuses this one too, the bot stops until you do.", latest, cur)
	g.connect(ctx)
}

// versionNote runs at every connect: the version presented was accepted.
// It tells the owner, once, that the version changed.
func (g *Gateway) versionNote() {
	g.verConnected = true
	if g.verNote != "" {
		g.notifyOwner(g.verNote)
		g.verNote = ""
	}
}

// pairHint says what to do next while no device is linked: once when the
// store opens and every PairHintEvery after.
func (g *Gateway) pairHint() {
	if !g.lc.JID().IsEmpty() {
		return
	}
	where := g.cfg.PairURL
	if where == "" {
		where = "/pair on the health service"
	}
	g.log.Warn("not linked: open " + where)
}
