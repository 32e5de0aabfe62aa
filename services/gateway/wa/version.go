package wa

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/blacksky-md/blacksky/services/gateway"
	"go.mau.fi/whatsmeow"
	"go.mau.fi/whatsmeow/store"
)

var _ gateway.VersionSource = WebVersion{}

// WebVersion is the gateway's VersionSource over whatsmeow: the version
// whatsmeow presents at login (store.GetWAVersion), WhatsApp's current one
// read from web.whatsapp.com (whatsmeow.GetLatestVersion), applied with
// store.SetWAVersion. whatsmeow keeps the version in a package variable, so
// it is one per process, like the device name.
type WebVersion struct {
	// HTTP fetches the version page; nil means http.DefaultClient.
	HTTP *http.Client
}

// Current is the version the next Connect presents.
func (WebVersion) Current() string { return store.GetWAVersion().String() }

// Latest fetches the version WhatsApp's web client serves now.
func (v WebVersion) Latest(ctx context.Context) (string, error) {
	latest, err := whatsmeow.GetLatestVersion(ctx, v.HTTP)
	if err != nil {
		return "", fmt.Errorf("wa: fetch the current web version: %w", err)
	}
	return latest.String(), nil
}

// Use makes version ("2.3000.1023456789") the one every later Connect
// presents.
func (WebVersion) Use(version string) error {
	parts := strings.Split(version, ".")
	var vc store.WAVersionContainer
	if len(parts) != len(vc) {
		return fmt.Errorf("wa: web version %q: want three numbers", version)
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return fmt.Errorf("wa: web version %q: %w", version, err)
		}
		vc[i] = uint32(n)
	}
	if vc.IsZero() {
		return fmt.Errorf("wa: web version %q is zero", version)
	}
	store.SetWAVersion(vc)
	return nil
}
