package gateway

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// fakeVersions stands in for WhatsApp's version page and whatsmeow's
// version variable (package wa tests the real ones against an httptest
// server).
type fakeVersions struct {
	mu      sync.Mutex
	current string
	latest  string
	err     error
	fetches int
}

var _ VersionSource = (*fakeVersions)(nil)

func (f *fakeVersions) Current() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.current
}

func (f *fakeVersions) Latest(context.Context) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fetches++
	return f.latest, f.err
}

func (f *fakeVersions) Use(v string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.current = v
	return nil
}

func (f *fakeVersions) set(latest string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.latest, f.err = latest, err
}

func (f *fakeVersions) get() (current string, fetches int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.current, f.fetches
}

var linkedJID = types.NewJID("15559998888", types.DefaultUserServer)

// loopSync sends an event through the state machine's loop and waits for
// its answer, so timer ticks that were due before it have been seen.
func (h *harness) loopSync() {
	h.t.Helper()
	h.conn.emit(&events.KeepAliveRestored{})
	h.rec.next(h.t, bus.ConnKeepaliveRestored)
}

func withVersions(v *fakeVersions) func(*Deps) {
	return func(d *Deps) { d.Versions = v }
}

// outdated emits client_outdated and checks the gateway closes the socket
// and says so.
func (h *harness) outdated() {
	h.t.Helper()
	h.conn.emit(&events.ClientOutdated{})
	h.rec.next(h.t, bus.ConnClientOutdated)
}

func (h *harness) connects() int { return h.conn.get(func(f *fakeConn) int { return f.connects }) }

// stays asserts the gateway stopped for good: no reconnect, not in two days,
// not after another failure.
func (h *harness) staysOutdated() {
	h.t.Helper()
	n := h.connects()
	h.advance(48 * time.Hour)
	h.conn.emit(&events.Disconnected{})
	h.rec.next(h.t, bus.ConnDisconnected)
	h.probe()
	h.rec.none(h.t)
	if got := h.connects(); got != n {
		h.t.Fatalf("connects = %d after stopping, want %d", got, n)
	}
	if got := h.gw.State(); got != bus.StateOutdated {
		h.t.Fatalf("state = %q, want %q", got, bus.StateOutdated)
	}
}

func TestClientOutdatedReconnectsWithWhatsAppsCurrentVersion(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", latest: "2.3000.200"}
	h := startWith(t, withVersions(v))
	h.connected()

	h.outdated()
	h.rec.next(t, bus.ConnConnecting)
	if cur, n := v.get(); cur != "2.3000.200" || n != 1 {
		t.Fatalf("version %q after %d fetches, want 2.3000.200 after 1", cur, n)
	}
	if h.connects() != 2 {
		t.Fatalf("connects = %d, want 2", h.connects())
	}
	// Back in: the owner hears which version it now presents.
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)
	testwait.For(t, 5*time.Second, "owner told of the new version", func() bool {
		for _, m := range h.conn.sentMsgs() {
			if m.To.User == "15550001111" && strings.Contains(m.Text, "2.3000.200") && strings.Contains(m.Text, "2.3000.100") {
				return true
			}
		}
		return false
	})

}

// The fetched version is refused before it ever connected: nothing newer
// is to be had from WhatsApp, so the gateway stops until a redeploy.
func TestClientOutdatedStopsWhenTheFetchedVersionIsRefused(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", latest: "2.3000.200"}
	h := startWith(t, withVersions(v))
	h.connected()
	h.outdated()
	h.rec.next(t, bus.ConnConnecting)
	h.outdated() // the fetched version, refused at once
	if _, n := v.get(); n != 1 {
		t.Fatalf("fetches = %d, want no second fetch within the hour", n)
	}
	h.staysOutdated()
}

// The fetched version connected, and WhatsApp refuses it later within the
// hour: not a reason to stop. The next fetch comes at the next allowed time
// (an hour after the last), by reconnecting then.
func TestClientOutdatedAfterTheFetchedVersionConnectedFetchesAgainAtTheNextAllowedTime(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", latest: "2.3000.200"}
	h := startWith(t, withVersions(v))
	h.connected()
	h.outdated()
	h.rec.next(t, bus.ConnConnecting)
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)

	h.advance(59 * time.Minute)
	v.set("2.3000.300", nil)
	h.outdated()
	r := h.rec.next(t, bus.ConnReconnecting)
	if r.DelayMS != time.Minute.Milliseconds() {
		t.Fatalf("retry in %dms, want at the next allowed fetch, in 1m", r.DelayMS)
	}
	if _, n := v.get(); n != 1 {
		t.Fatalf("fetches = %d, want no second fetch within the hour", n)
	}
	h.advance(time.Minute - time.Millisecond)
	h.probe()
	h.rec.none(t)
	h.advance(time.Millisecond)
	h.rec.next(t, bus.ConnConnecting) // with 2.3000.200: WhatsApp says outdated again
	h.outdated()
	h.rec.next(t, bus.ConnConnecting) // fetched this time
	if cur, n := v.get(); cur != "2.3000.300" || n != 2 {
		t.Fatalf("version %q after %d fetches, want 2.3000.300 after 2", cur, n)
	}
	if got := h.gw.State(); got == bus.StateOutdated {
		t.Fatalf("state = %q: stopped although the fetched version had connected", got)
	}
}

func TestClientOutdatedAgainAfterAnHourFetchesAgain(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", latest: "2.3000.200"}
	h := startWith(t, withVersions(v))
	h.connected()
	h.outdated()
	h.rec.next(t, bus.ConnConnecting)
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)

	// Weeks later WhatsApp moves on again.
	h.advance(VersionRefreshEvery)
	v.set("2.3000.300", nil)
	h.outdated()
	h.rec.next(t, bus.ConnConnecting)
	if cur, n := v.get(); cur != "2.3000.300" || n != 2 {
		t.Fatalf("version %q after %d fetches, want 2.3000.300 after 2", cur, n)
	}
}

func TestClientOutdatedWhenWhatsAppServesTheRefusedVersionStops(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", latest: "2.3000.100"}
	h := startWith(t, withVersions(v))
	h.connected()
	h.outdated()
	h.staysOutdated()
	if _, n := v.get(); n != 1 {
		t.Fatalf("fetches = %d, want 1", n)
	}
	if h.logs.Count("Update blacksky") != 1 {
		t.Fatalf("want one line telling to update blacksky:\n%s", h.logs.String())
	}
}

func TestClientOutdatedFetchFailureTriesAgainInAnHour(t *testing.T) {
	v := &fakeVersions{current: "2.3000.100", err: errors.New("lookup web.whatsapp.com: no such host")}
	h := startWith(t, withVersions(v))
	h.connected()
	h.outdated()
	r := h.rec.next(t, bus.ConnReconnecting)
	if r.DelayMS != VersionRefreshEvery.Milliseconds() {
		t.Fatalf("retry in %dms, want %s", r.DelayMS, VersionRefreshEvery)
	}
	h.advance(VersionRefreshEvery - time.Millisecond)
	h.probe()
	h.rec.none(t)

	v.set("2.3000.200", nil)
	h.advance(time.Millisecond)
	h.rec.next(t, bus.ConnConnecting) // with the old version: WhatsApp says outdated again
	h.outdated()
	h.rec.next(t, bus.ConnConnecting) // fetched this time
	if cur, n := v.get(); cur != "2.3000.200" || n != 2 {
		t.Fatalf("version %q after %d fetches, want 2.3000.200 after 2", cur, n)
	}
}

func TestNotLinkedSaysWhereToPair(t *testing.T) {
	const line = "not linked: open https://my-bot.herokuapp.com/pair"
	h := start(t,
		func(c *Config, _ *fakeConn) {
			c.PairURL = "https://my-bot.herokuapp.com/pair"
			c.LoginTimeout = 24 * time.Hour // nothing but the hint happens meanwhile
		})
	h.rec.next(t, bus.ConnConnecting)
	testwait.For(t, 5*time.Second, "the hint at start", func() bool { return h.logs.Count(line) == 1 })

	h.advance(DefaultPairHintEvery - time.Second)
	h.loopSync()
	if n := h.logs.Count(line); n != 1 {
		t.Fatalf("hint logged %d times before the period, want 1", n)
	}
	h.advance(time.Second)
	testwait.For(t, 5*time.Second, "the hint again after the period", func() bool { return h.logs.Count(line) == 2 })

	// Linked: no more hints.
	h.conn.mu.Lock()
	h.conn.jid = linkedJID
	h.conn.mu.Unlock()
	h.conn.emit(&events.Connected{})
	h.rec.next(t, bus.ConnConnected)
	h.advance(3 * DefaultPairHintEvery)
	h.loopSync()
	if n := h.logs.Count(line); n != 2 {
		t.Fatalf("hint logged %d times, want none once linked", n)
	}
}
