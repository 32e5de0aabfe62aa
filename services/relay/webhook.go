package relay

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/riverqueue/river"
)

// Webhook headers. The signature is "sha256=" and the hex HMAC-SHA256, under
// WEBHOOK_SECRET, of the timestamp (unix seconds, as in
// X-Blacksky-Timestamp), a '.', and the body: a receiver recomputes it and
// refuses a timestamp too far from its own clock, so a captured request
// cannot be replayed later. X-Blacksky-Delivery is the same on every
// delivery of one item (a receiver deduplicates on it).
const (
	HeaderSignature = "X-Blacksky-Signature"
	HeaderTimestamp = "X-Blacksky-Timestamp"
	HeaderEvent     = "X-Blacksky-Event"
	HeaderDelivery  = "X-Blacksky-Delivery"
)

// Sign is the X-Blacksky-Signature of body sent at timestamp (unix
// seconds).
func Sign(secret string, timestamp int64, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(strconv.FormatInt(timestamp, 10)))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// post delivers one item to the webhook. 2xx is delivered. 408, 429, 5xx, a
// timeout or no answer retry with backoff until WEBHOOK_RETRY_FOR has passed
// since the first attempt failed; then, or at once for any other status
// (a 3xx too: redirects are not followed), the
// delivery is dead (a cancelled River job: River UI, /status and
// blacksky deliveries retry show it).
func (s *Service) post(ctx context.Context, job JobInfo, r rendered) error {
	if s.cfg.WebhookURL == "" {
		return nil // WEBHOOK_URL was unset since the job was queued
	}
	err := s.postOnce(ctx, r)
	if err == nil {
		return nil
	}
	var perm *permanentError
	if errors.As(err, &perm) {
		return s.dead(r, err)
	}
	if !job.FirstFailedAt.IsZero() && job.AttemptedAt.Sub(job.FirstFailedAt) >= s.cfg.WebhookRetryFor {
		return s.dead(r, fmt.Errorf("gave up after WEBHOOK_RETRY_FOR (%s): %w", s.cfg.WebhookRetryFor, err))
	}
	return err
}

// dead ends a webhook delivery for good, saying why where an operator looks
// (River keeps the error on the job too): blacksky deliveries retry sends it
// again once the receiver is fixed.
func (s *Service) dead(r rendered, err error) error {
	s.log.Warn("webhook delivery dead; blacksky deliveries retry sends it again", "event", r.event, "delivery", r.id, "err", err)
	return river.JobCancel(err)
}

// permanentError is a status a retry will not change.
type permanentError struct{ status int }

func (e *permanentError) Error() string {
	if e.status >= 300 && e.status < 400 {
		return fmt.Sprintf("webhook answered %d, a redirect: not followed (a redirected POST arrives as a GET "+
			"without its body) and not retried; set WEBHOOK_URL to the address it redirects to", e.status)
	}
	return fmt.Sprintf("webhook answered %d: not retried", e.status)
}

func (s *Service) postOnce(ctx context.Context, r rendered) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WebhookTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.WebhookURL, bytes.NewReader(r.body))
	if err != nil {
		return river.JobCancel(errors.New("WEBHOOK_URL is not a valid URL"))
	}
	ts := s.clock.Now().Unix()
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "blacksky-relay")
	req.Header.Set(HeaderEvent, r.event)
	req.Header.Set(HeaderDelivery, r.id)
	req.Header.Set(HeaderTimestamp, strconv.FormatInt(ts, 10))
	if s.cfg.WebhookSecret != "" {
		req.Header.Set(HeaderSignature, Sign(s.cfg.WebhookSecret, ts, r.body))
	}
	resp, err := s.http.Do(req)
	if err != nil {
		return fmt.Errorf("webhook %s: %s", RedactURL(s.cfg.WebhookURL), redactErr(err))
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch c := resp.StatusCode; {
	case c >= 200 && c < 300:
		return nil
	case c == http.StatusRequestTimeout, c == http.StatusTooManyRequests, c >= 500:
		return fmt.Errorf("webhook %s answered %d", RedactURL(s.cfg.WebhookURL), c)
	default:
		return &permanentError{status: c}
	}
}

// redactErr is an HTTP client error without the URL it quotes (which may
// hold credentials in its userinfo or query).
func redactErr(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Op + ": " + ue.Err.Error()
	}
	return err.Error()
}
