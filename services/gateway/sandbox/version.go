package sandbox

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/blacksky-md/blacksky/services/gateway"
	"go.mau.fi/whatsmeow/store"
)

// The client version, as WhatsApp sees it: the server file keeps the
// lowest version the server accepts ("min_version") and the one its web
// client serves ("latest_version"); the process presents whatsmeow's
// compiled version until told to Use another, as whatsmeow's package
// variable does. A login presenting a version below the minimum meets
// client outdated (whatsmeow's 405 connect failure).

var _ gateway.VersionSource = (*Versions)(nil)

// Versions is the gateway's VersionSource in sandbox mode: the version the
// sandbox client presents, and the one the sandbox's web client serves.
type Versions struct {
	srv *Server
}

// Versions returns the server's VersionSource.
func (s *Server) Versions() *Versions { return &Versions{srv: s} }

// Current is the version the next login presents.
func (v *Versions) Current() string { return v.srv.version.get() }

// Latest is the version the sandbox's web client serves: the one the
// client_outdated fault offered, else the one presented now.
func (v *Versions) Latest(ctx context.Context) (string, error) {
	latest, err := getMeta(ctx, v.srv.db, "latest_version")
	if err != nil {
		return "", fmt.Errorf("sandbox: read the served version: %w", err)
	}
	if latest == "" {
		return v.Current(), nil
	}
	return latest, nil
}

// Use makes version the one every later login presents.
func (v *Versions) Use(version string) error {
	if _, err := parseVersion(version); err != nil {
		return err
	}
	v.srv.version.set(version)
	return nil
}

// presented is the version the process presents at login.
type presented struct {
	mu sync.Mutex
	v  string
}

func (p *presented) get() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.v == "" {
		return store.GetWAVersion().String()
	}
	return p.v
}

func (p *presented) set(v string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.v = v
}

func parseVersion(v string) ([3]uint64, error) {
	var out [3]uint64
	parts := strings.Split(v, ".")
	if len(parts) != 3 {
		return out, fmt.Errorf("sandbox: web version %q: want three numbers", v)
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return out, fmt.Errorf("sandbox: web version %q: %w", v, err)
		}
		out[i] = n
	}
	if out == [3]uint64{} {
		return out, fmt.Errorf("sandbox: web version %q is zero", v)
	}
	return out, nil
}

func formatVersion(v [3]uint64) string {
	return fmt.Sprintf("%d.%d.%d", v[0], v[1], v[2])
}

func less(a, b [3]uint64) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}

// outdated says whether the server refuses the version presented now.
func (s *Server) outdated(ctx context.Context) (bool, error) {
	minS, err := getMeta(ctx, s.db, "min_version")
	if err != nil || minS == "" {
		return false, err
	}
	least, err := parseVersion(minS)
	if err != nil {
		return false, err
	}
	cur, err := parseVersion(s.version.get())
	if err != nil {
		return false, err
	}
	return less(cur, least), nil
}

// outdate refuses the version presented now and the next refused-1 newer
// ones, and serves the first of those newer ones: a client that fetches it
// logs in again when refused is 1, and is refused once more otherwise.
func (s *Server) outdate(ctx context.Context, refused int) error {
	cur, err := parseVersion(s.version.get())
	if err != nil {
		return err
	}
	latest := cur
	latest[2]++
	least := cur
	least[2] += uint64(refused)
	return s.setMeta(ctx, "min_version", formatVersion(least), "latest_version", formatVersion(latest))
}
