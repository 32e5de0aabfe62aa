package health

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/config"
	"github.com/jonboulle/clockwork"
)

// keepAwake fetches HEROKU_APP_URL/healthz every interval: an eco dyno sleeps
// after 30 minutes without outside traffic, and a sleeping dyno drops the
// WhatsApp socket. The request goes through Heroku's router, so it counts.
type keepAwake struct {
	target   string
	interval time.Duration
	clock    clockwork.Clock
	client   *http.Client
	log      *slog.Logger
	metrics  *metrics
}

func newKeepAwake(appURL string, interval time.Duration, clock clockwork.Clock, client *http.Client, log *slog.Logger, m *metrics) *keepAwake {
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	return &keepAwake{
		target:   strings.TrimSuffix(appURL, "/") + "/healthz",
		interval: interval,
		clock:    clock,
		client:   client,
		log:      log,
		metrics:  m,
	}
}

// run pings on every tick of the injected clock until ctx ends.
func (k *keepAwake) run(ctx context.Context) {
	t := k.clock.NewTicker(k.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.Chan():
			k.ping(ctx)
		}
	}
}

func (k *keepAwake) ping(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	result := "ok"
	defer func() { k.metrics.keepAwake.WithLabelValues(result).Inc() }()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.target, nil)
	if err != nil {
		result = "error"
		k.log.Warn("keep-awake: bad url", "url", config.RedactURL(k.target))
		return
	}
	req.Header.Set("User-Agent", "blacksky-keepawake")
	resp, err := k.client.Do(req)
	if err != nil {
		result = "error"
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // it quotes the URL whole; the log shows it redacted
		}
		if ctx.Err() == nil || ctx.Err() == context.DeadlineExceeded {
			k.log.Warn("keep-awake ping failed", "url", config.RedactURL(k.target), "err", err)
		}
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		result = "bad_status"
		k.log.Warn("keep-awake ping answered", "url", config.RedactURL(k.target), "status", resp.StatusCode)
		return
	}
	k.log.Debug("keep-awake ping", "url", config.RedactURL(k.target))
}
