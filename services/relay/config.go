package relay

import (
	"cmp"
	"fmt"
	"net/url"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"golang.org/x/time/rate"
)

// Config is relay's behaviour; zero values are defaults.
type Config struct {
	// Session is SESSION_ID.
	Session string
	// Key is SESSION_ENCRYPTION_KEY (nil: payloads stored plaintext).
	Key []byte
	// Retention is MESSAGE_RETENTION: messages, receipts and finished
	// sends older than this are deleted. Zero: DefaultRetention.
	Retention time.Duration
	// PruneEvery is how often relay prunes; zero: Retention/24, at most
	// an hour.
	PruneEvery time.Duration

	// SendRate is SEND_RATE, burst 1 (at most N+1 sends in any window of
	// one period, as the gateway paced before). Zero: 20 a minute.
	SendRate rate.Limit
	// GatewayTimeout bounds one P.gateway.send request; it must outlast
	// the gateway's own send timeout. Zero: DefaultGatewayTimeout.
	GatewayTimeout time.Duration
	// SendWait is how long a P.msg.send with wait waits for its outcome
	// before answering that it is still queued. Zero: DefaultSendWait.
	SendWait time.Duration
	// MaxQueuedSends refuses new sends while this many wait. Zero:
	// DefaultMaxQueuedSends.
	MaxQueuedSends int64

	// WebhookURL is WEBHOOK_URL; empty: no webhook.
	WebhookURL    string
	WebhookSecret string
	// WebhookEvents is WEBHOOK_EVENTS: event names (msg.in, msg.receipt,
	// msg.sent, msg.send_failed, conn.<kind>) or patterns (conn.*). Empty:
	// DefaultWebhookEvents.
	WebhookEvents []string
	// WebhookRetryFor is WEBHOOK_RETRY_FOR; zero: DefaultWebhookRetryFor.
	WebhookRetryFor time.Duration
	// WebhookTimeout bounds one POST; zero: DefaultWebhookTimeout.
	WebhookTimeout time.Duration

	// ReplayLimit is P.msg.replay's default limit, ReplayMax its largest.
	ReplayLimit int
	ReplayMax   int

	// StopGrace is how long jobs running when relay stops may finish
	// (a webhook POST, a send waiting for the gateway) before they are
	// cancelled; a cancelled job counts no attempt and runs again once
	// relay is back. cmd gives a fifth of SHUTDOWN_TIMEOUT, so backup's
	// shutdown snapshot after relay keeps its time. Zero: DefaultStopGrace.
	StopGrace time.Duration
}

// Defaults of Config.
const (
	DefaultRetention       = 7 * 24 * time.Hour
	DefaultGatewayTimeout  = 2 * time.Minute
	DefaultSendWait        = bus.ResponseWindow - 30*time.Second
	DefaultMaxQueuedSends  = 1000
	DefaultWebhookRetryFor = 24 * time.Hour
	DefaultWebhookTimeout  = 10 * time.Second
	DefaultSendRate        = rate.Limit(20.0 / 60)
	DefaultReplayLimit     = 100
	DefaultReplayMax       = 1000
	DefaultStopGrace       = 5 * time.Second
)

// DefaultWebhookEvents is WEBHOOK_EVENTS' default.
var DefaultWebhookEvents = []string{"msg.in", "conn.*"}

// Events relay can post to the webhook.
var webhookEventNames = []string{"msg.in", "msg.receipt", "msg.sent", "msg.send_failed"}

// CheckWebhookEvents refuses a WEBHOOK_EVENTS entry that names no event.
func CheckWebhookEvents(events []string) error {
	for _, e := range events {
		if slices.Contains(webhookEventNames, e) || e == "conn.*" {
			continue
		}
		if k, ok := strings.CutPrefix(e, "conn."); ok && slices.Contains(bus.ConnKinds, k) {
			continue
		}
		return fmt.Errorf("unknown event %q: want msg.in, msg.receipt, msg.sent, msg.send_failed, conn.* or conn.<kind>", e)
	}
	return nil
}

func (c Config) withDefaults() Config {
	c.Retention = cmp.Or(c.Retention, DefaultRetention)
	if c.PruneEvery == 0 {
		c.PruneEvery = min(c.Retention/24, time.Hour)
	}
	c.SendRate = cmp.Or(c.SendRate, DefaultSendRate)
	c.GatewayTimeout = cmp.Or(c.GatewayTimeout, DefaultGatewayTimeout)
	c.SendWait = cmp.Or(c.SendWait, DefaultSendWait)
	c.MaxQueuedSends = cmp.Or(c.MaxQueuedSends, DefaultMaxQueuedSends)
	if len(c.WebhookEvents) == 0 {
		c.WebhookEvents = DefaultWebhookEvents
	}
	c.WebhookRetryFor = cmp.Or(c.WebhookRetryFor, DefaultWebhookRetryFor)
	c.WebhookTimeout = cmp.Or(c.WebhookTimeout, DefaultWebhookTimeout)
	c.ReplayLimit = cmp.Or(c.ReplayLimit, DefaultReplayLimit)
	c.ReplayMax = cmp.Or(c.ReplayMax, DefaultReplayMax)
	c.StopGrace = cmp.Or(c.StopGrace, DefaultStopGrace)
	return c
}

// wants reports whether the webhook takes event (msg.in, conn.connected).
func (c Config) wants(event string) bool {
	if c.WebhookURL == "" {
		return false
	}
	for _, p := range c.WebhookEvents {
		if ok, _ := path.Match(p, event); ok && !strings.Contains(p, "/") {
			return true
		}
	}
	return false
}

// RedactURL is a webhook URL as it may be logged or shown: no userinfo, no
// query (either may hold a credential).
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL, not shown)"
	}
	if u.User != nil {
		u.User = url.User("xxxxx")
	}
	if u.RawQuery != "" {
		u.RawQuery = "xxxxx"
	}
	u.Fragment = ""
	return u.String()
}
