package config

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"
)

type parser struct {
	getenv Getenv
	err    error
}

func (p *parser) fail(name, accepts, got string) {
	if p.err != nil {
		return
	}
	shown := strconv.Quote(got)
	if v, ok := Lookup(name); ok && v.Secret {
		shown = fmt.Sprintf("a value of %d characters (not shown)", len(got))
	}
	p.err = &Error{Var: name, Accepts: accepts, Got: shown}
}

// str returns the variable, or its default when unset or blank.
func (p *parser) str(name string) string {
	if v := strings.TrimSpace(p.getenv(name)); v != "" {
		return v
	}
	d, _ := Lookup(name)
	return d.Default
}

func (p *parser) intRange(name string, lo, hi int) int {
	s := p.str(name)
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		p.fail(name, fmt.Sprintf("a whole number from %d to %d", lo, hi), s)
		return 0
	}
	return n
}

// ParseBool accepts true/false/1/0/yes/no/on/off in any case.
func ParseBool(s string) (bool, bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "1", "yes", "y", "on":
		return true, true
	case "false", "0", "no", "n", "off":
		return false, true
	}
	return false, false
}

func (p *parser) boolean(name string) bool {
	s := p.str(name)
	b, ok := ParseBool(s)
	if !ok {
		p.fail(name, "true/false, 1/0 or yes/no", s)
	}
	return b
}

func (p *parser) duration(name string, min time.Duration) time.Duration {
	s := p.str(name)
	d, err := time.ParseDuration(s)
	if err != nil || d < min {
		p.fail(name, "a duration such as 90s or 30m (at least "+min.String()+")", s)
		return 0
	}
	return d
}

// days reads a Go duration or a whole number of days ("7d").
func (p *parser) days(name string, min time.Duration) time.Duration {
	s := p.str(name)
	if n, ok := strings.CutSuffix(s, "d"); ok {
		if d, err := strconv.Atoi(n); err == nil && d >= 1 && d <= 3650 {
			return time.Duration(d) * 24 * time.Hour
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < min {
		p.fail(name, "a duration such as 72h or a number of days such as 7d (at least "+min.String()+")", s)
		return 0
	}
	return d
}

func (p *parser) minutesOrDuration(name string) time.Duration {
	s := p.str(name)
	if n, err := strconv.ParseFloat(s, 64); err == nil {
		// !(n >= ...) also refuses NaN; under a second would snapshot non-stop.
		if !(n >= 1.0/60) || n > 60*24*365 {
			p.fail(name, "a number of minutes from 1/60 (one second) to a year, or a duration such as 30m", s)
			return 0
		}
		return time.Duration(n * float64(time.Minute))
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < time.Second {
		p.fail(name, "a number of minutes (30) or a duration such as 30m or 90s", s)
		return 0
	}
	return d
}

// retention is a count (48) or an age: a Go duration (36h) or whole days
// (7d). A count returns age 0; an age returns count 0.
func (p *parser) retention(name string) (count int, age time.Duration) {
	s := p.str(name)
	const accepts = "a whole number of points and snapshots from 1 to 100000 (48), or an age such as 7d or 36h (at least a minute, at most 10 years)"
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 100000 {
			p.fail(name, accepts, s)
			return 0, 0
		}
		return n, 0
	}
	var err error
	if days, ok := strings.CutSuffix(s, "d"); ok {
		var n int
		if n, err = strconv.Atoi(days); err == nil && n >= 1 && n <= 3650 {
			return 0, time.Duration(n) * 24 * time.Hour
		}
		p.fail(name, accepts, s)
		return 0, 0
	}
	age, err = time.ParseDuration(s)
	if err != nil || age < time.Minute || age > 3650*24*time.Hour {
		p.fail(name, accepts, s)
		return 0, 0
	}
	return 0, age
}

// optionalDuration is a duration where 0 turns the feature off.
func (p *parser) optionalDuration(name string, min time.Duration) time.Duration {
	s := p.str(name)
	if s == "0" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < min || d > time.Hour {
		p.fail(name, "a duration such as 1s or 500ms (at least "+min.String()+", at most 1h), or 0 for off", s)
		return 0
	}
	return d
}

func (p *parser) phone(name string) string {
	raw := p.str(name)
	s := strings.TrimPrefix(strings.Join(strings.Fields(raw), ""), "+")
	s = strings.ReplaceAll(s, "-", "")
	if s == "" {
		return ""
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			p.fail(name, "a phone number in international form, digits only (a leading + and spaces are stripped)", raw)
			return ""
		}
	}
	if len(s) < 7 || len(s) > 15 {
		p.fail(name, "7 to 15 digits (country code first)", raw)
		return ""
	}
	return s
}

// ParseKey decodes a 32-byte key given as 64 hex or 44 base64 characters.
func ParseKey(s string) ([]byte, error) {
	if len(s) == 64 {
		if b, err := hex.DecodeString(s); err == nil {
			return b, nil
		}
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
		if b, err := enc.DecodeString(s); err == nil && len(b) == 32 {
			return b, nil
		}
	}
	return nil, errors.New("not a 32-byte key")
}

func (p *parser) key(name string) []byte {
	s := p.str(name)
	if s == "" {
		return nil
	}
	k, err := ParseKey(s)
	if err != nil {
		p.fail(name, "64 hex or 44 base64 characters (32 bytes; generate with: openssl rand -hex 32)", s)
		return nil
	}
	return k
}

func (p *parser) rate(name string) Rate {
	s := p.str(name)
	n, unit, ok := strings.Cut(s, "/")
	per := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour}[strings.ToLower(unit)]
	count, err := strconv.Atoi(n)
	if !ok || per == 0 || err != nil || count < 1 {
		p.fail(name, "N/s, N/m or N/h with N at least 1 (e.g. 20/m)", s)
		return Rate{}
	}
	return Rate{N: count, Per: per}
}

func (p *parser) level(name string) slog.Level {
	s := p.str(name)
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		p.fail(name, "debug, info, warn or error", s)
	}
	return l
}
