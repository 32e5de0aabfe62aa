package config

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// RedactURL hides the password (and a token in the user part) of a URL so it
// can be logged; an unparsable value is hidden whole.
func RedactURL(raw string) string {
	if raw == "" {
		return ""
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL, not shown)"
	}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		} else {
			u.User = url.User("xxxxx")
		}
	}
	q := u.Query()
	for k := range q {
		lk := strings.ToLower(k)
		if strings.Contains(lk, "pass") || strings.Contains(lk, "token") || strings.Contains(lk, "key") || strings.Contains(lk, "secret") {
			q.Set(k, "xxxxx")
		}
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// Secrets returns the secret values of c, so tests and redaction can check
// that none of them leaks.
func (c *Config) Secrets() []string {
	return append(secrets(c.NATSToken, c.NATSInternalSecret, c.HealthToken, c.DatabaseURL, c.NATSURL, c.SessionEncryptionKey, ""),
		webhookSecrets(c.WebhookSecret, c.WebhookURL)...)
}

// webhookSecrets are WEBHOOK_SECRET and what WEBHOOK_URL may hide: the
// password of its userinfo and the values of its query.
func webhookSecrets(secret, raw string) []string {
	var out []string
	if secret != "" {
		out = append(out, secret)
	}
	out = append(out, urlSecrets(raw, false)...)
	if u, err := url.Parse(raw); err == nil {
		for _, vs := range u.Query() {
			for _, v := range vs {
				if len(v) >= 4 {
					out = append(out, v)
				}
			}
		}
	}
	return out
}

// EnvSecrets returns the secret values in the environment without checking
// them, for what is printed when Load itself failed: the error at exit is
// redacted against them too.
func EnvSecrets(getenv Getenv) []string {
	get := func(name string) string { return strings.TrimSpace(getenv(name)) }
	key, _ := ParseKey(get("SESSION_ENCRYPTION_KEY"))
	return append(secrets(get("NATS_TOKEN"), get("NATS_INTERNAL_SECRET"), get("HEALTH_TOKEN"), get("DATABASE_URL"), get("NATS_URL"), key,
		get("SESSION_ENCRYPTION_KEY")), webhookSecrets(get("WEBHOOK_SECRET"), get("WEBHOOK_URL"))...)
}

func secrets(natsToken, internalSecret, healthToken, databaseURL, natsURL string, key []byte, rawKey string) []string {
	var out []string
	for _, s := range []string{natsToken, internalSecret, healthToken, rawKey} {
		if s != "" {
			out = append(out, s)
		}
	}
	out = append(out, urlSecrets(databaseURL, false)...)
	// NATS_URL may list several servers, comma-separated, each with its own
	// credentials.
	for _, one := range strings.Split(natsURL, ",") {
		out = append(out, urlSecrets(strings.TrimSpace(one), true)...)
	}
	if len(key) > 0 {
		out = append(out, hex.EncodeToString(key), base64.StdEncoding.EncodeToString(key))
	}
	return out
}

// checkNATSURL reads every server of a NATS_URL as nats.go will (a server
// without a scheme gets nats://) and says which one it cannot use, without
// quoting it: url.Parse's errors quote the URL whole, password included.
func checkNATSURL(raw string) string {
	servers := strings.Split(raw, ",")
	n := 0
	for i, one := range servers {
		one = strings.TrimSpace(one)
		where := fmt.Sprintf("server %d of %d", i+1, len(servers))
		if one == "" {
			continue // nats.go skips empty entries too
		}
		n++
		if !strings.Contains(one, "://") {
			one = "nats://" + one
		}
		u, err := url.Parse(one)
		switch {
		case err != nil:
			return where + " does not parse"
		case u.Scheme != "nats" && u.Scheme != "tls" && u.Scheme != "ws" && u.Scheme != "wss":
			return where + " has a scheme other than nats, tls, ws or wss"
		case u.Hostname() == "":
			return where + " names no host"
		case strings.Contains(u.Path+u.RawQuery+u.Fragment, "@"):
			// "nats://tok#en@h" parses with host "tok": the credential
			// would be dialled, and logged, as a host name.
			return where + " holds an @ after its host"
		}
		if port := u.Port(); port != "" {
			if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
				return where + " has a bad port"
			}
		}
	}
	if n == 0 {
		return "no server"
	}
	return ""
}

// urlSecrets returns the password of a URL, or for NATS the token in its
// user part (nats://TOKEN@host), and for NATS the whole URL when it holds
// credentials (nats.go's errors quote a server whole). The user part is
// read by hand, as everything up to the last '@', with or without a
// scheme: a URL that does not parse (a password holding '/' or '#') is
// quoted whole by the error that says so.
func urlSecrets(raw string, nats bool) []string {
	rest := raw
	if _, r, ok := strings.Cut(raw, "://"); ok {
		rest = r
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return nil
	}
	name, pw, hasPW := strings.Cut(rest[:at], ":")
	var out []string
	add := func(v string) {
		out = append(out, v)
		if dec, err := url.PathUnescape(v); err == nil && dec != v {
			out = append(out, dec)
		}
	}
	switch {
	// A password equal to the user name (compose's local default) protects
	// nothing, and redacting it would mangle every table name that contains
	// it.
	case hasPW && pw != "" && pw != name:
		add(pw)
	case !hasPW && name != "" && nats:
		add(name)
	}
	if nats {
		out = append(out, raw)
	}
	return out
}
