package bus

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"time"
)

// The WhatsApp sandbox's control surface (WHATSAPP_SANDBOX=true): requests
// answered by the process that runs the gateway in sandbox mode (link,
// inject, fault, receipt, outbox), and one event for every message the bot
// sent.

// SandboxLink is P.sandbox.link.
func (s Subjects) SandboxLink() string { return s.Prefix + ".sandbox.link" }

// SandboxInject is P.sandbox.inject.
func (s Subjects) SandboxInject() string { return s.Prefix + ".sandbox.inject" }

// SandboxFault is P.sandbox.fault.
func (s Subjects) SandboxFault() string { return s.Prefix + ".sandbox.fault" }

// SandboxOutbox is P.sandbox.outbox.
func (s Subjects) SandboxOutbox() string { return s.Prefix + ".sandbox.outbox" }

// SandboxReceipt is P.sandbox.receipt.
func (s Subjects) SandboxReceipt() string { return s.Prefix + ".sandbox.receipt" }

// SandboxOut is P.sandbox.out.
func (s Subjects) SandboxOut() string { return s.Prefix + ".sandbox.out" }

// SandboxLinkRequest is a P.sandbox.link body: link the device now, as if
// the QR code had been scanned. Phone (digits) names the account; empty
// takes PAIR_PHONE's number when a pairing code was asked for, else a
// number made from the seed.
type SandboxLinkRequest struct {
	Phone string `json:"phone,omitempty"`
}

// SandboxLinkReply answers P.sandbox.link.
type SandboxLinkReply struct {
	OK    bool   `json:"ok"`
	JID   string `json:"jid,omitempty"`
	Error string `json:"error,omitempty"`
}

// SandboxInjectRequest is a P.sandbox.inject body: an incoming message (or
// Count of them, Rate per second) from the contact From.
type SandboxInjectRequest struct {
	From      string   `json:"from"`
	PushName  string   `json:"push_name,omitempty"`
	Group     string   `json:"group,omitempty"` // group id (digits, or digits-digits); empty: a direct chat
	Type      string   `json:"type,omitempty"`  // text (default), image, video, audio, document, sticker, reaction, location, contact, poll, revoke
	Text      string   `json:"text,omitempty"`  // text, caption, reaction emoji, poll question, contact name
	FileName  string   `json:"file_name,omitempty"`
	Target    string   `json:"target,omitempty"` // reaction and revoke: the message id they refer to
	Latitude  *float64 `json:"latitude,omitempty"`
	Longitude *float64 `json:"longitude,omitempty"`
	Options   []string `json:"options,omitempty"` // poll
	Count     int      `json:"count,omitempty"`   // default 1
	Rate      float64  `json:"rate,omitempty"`    // messages per second; 0: all at once
}

// SandboxInjectReply answers P.sandbox.inject once every message is
// committed to the sandbox's server file.
type SandboxInjectReply struct {
	OK    bool     `json:"ok"`
	Count int      `json:"count,omitempty"`
	IDs   []string `json:"ids,omitempty"` // at most the first MaxSandboxIDs
	Error string   `json:"error,omitempty"`
}

// SandboxFaultRequest is a P.sandbox.fault body. Only the fields of its
// kind are read; see docs/sandbox.md.
type SandboxFaultRequest struct {
	Kind     string `json:"kind"`
	Code     int    `json:"code,omitempty"`     // temporary_ban, connect_failure
	Message  string `json:"message,omitempty"`  // connect_failure
	Expire   string `json:"expire,omitempty"`   // temporary_ban: a duration
	Duration string `json:"duration,omitempty"` // keepalive_timeout: how long pings fail
	Count    int    `json:"count,omitempty"`    // send refusals; failing logins; refused versions
}

// SandboxFaultReply answers P.sandbox.fault.
type SandboxFaultReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// SandboxOutboxRequest is a P.sandbox.outbox body: the newest Limit sends.
type SandboxOutboxRequest struct {
	Limit int `json:"limit,omitempty"`
}

// SandboxReceiptRequest is a P.sandbox.receipt body: the contact's phone
// reports messages the bot sent it delivered or read. ID names one message
// (an id from P.sandbox.out or the outbox), IDs several sent to the same
// contact (a phone reads a chat's unread messages in one receipt); exactly
// one of them.
type SandboxReceiptRequest struct {
	ID   string   `json:"id,omitempty"`
	IDs  []string `json:"ids,omitempty"`
	Type string   `json:"type"` // delivered or read
}

// SandboxReceiptReply answers P.sandbox.receipt once the receipt is
// committed to the sandbox's server file: the chat it comes from and its
// timestamp (whole seconds, as WhatsApp's).
type SandboxReceiptReply struct {
	OK        bool       `json:"ok"`
	Chat      string     `json:"chat,omitempty"`
	Timestamp *time.Time `json:"timestamp,omitempty"`
	Error     string     `json:"error,omitempty"`
}

// SandboxSent is one message the bot sent, as P.sandbox.out and in outbox
// replies. Refused is set when the sandbox refused it as WhatsApp would.
type SandboxSent struct {
	Event
	ID        string    `json:"id,omitempty"`
	To        string    `json:"to"`
	Text      string    `json:"text"`
	Timestamp time.Time `json:"timestamp"`
	Refused   string    `json:"refused,omitempty"`
}

// SandboxOutboxReply answers P.sandbox.outbox, oldest first.
type SandboxOutboxReply struct {
	OK       bool          `json:"ok"`
	Messages []SandboxSent `json:"messages,omitempty"`
	Error    string        `json:"error,omitempty"`
}

// Bounds of sandbox requests.
const (
	MaxSandboxCount  = 100000
	MaxSandboxRate   = 10000.0
	MaxSandboxIDs    = 100
	MaxSandboxLimit  = 1000
	MaxSandboxField  = 1024 // names, file names, targets, options
	MaxSandboxOption = 12   // poll options
	// MaxSandboxReceiptIDs bounds the messages one receipt names.
	MaxSandboxReceiptIDs = 100
)

// DecodeSandboxLink reads a P.sandbox.link body; an empty body is {}.
func DecodeSandboxLink(data []byte) (SandboxLinkRequest, error) {
	var r SandboxLinkRequest
	if len(bytes.TrimSpace(data)) == 0 {
		return r, nil
	}
	if err := decodeStrict(data, &r); err != nil {
		return SandboxLinkRequest{}, err
	}
	if r.Phone != "" && !digits(r.Phone, 7, 15) {
		return SandboxLinkRequest{}, errors.New(`"phone": 7 to 15 digits, country code first`)
	}
	return r, nil
}

// DecodeSandboxInject reads a P.sandbox.inject body. The message type and
// its content are checked by the sandbox itself.
func DecodeSandboxInject(data []byte) (SandboxInjectRequest, error) {
	var r SandboxInjectRequest
	if err := decodeStrict(data, &r); err != nil {
		return SandboxInjectRequest{}, err
	}
	switch {
	case !digits(r.From, 5, 15):
		return SandboxInjectRequest{}, errors.New(`"from": the sender's phone number, 5 to 15 digits`)
	case r.Group != "" && !groupID(r.Group):
		return SandboxInjectRequest{}, errors.New(`"group": a group id of digits (or digits-digits), at most 40 characters`)
	case len(r.Text) > MaxTextLen:
		return SandboxInjectRequest{}, fmt.Errorf(`"text" is longer than %d bytes`, MaxTextLen)
	case len(r.PushName) > MaxSandboxField || len(r.FileName) > MaxSandboxField || len(r.Target) > MaxSandboxField || len(r.Type) > 32:
		return SandboxInjectRequest{}, fmt.Errorf("a field is longer than %d bytes", MaxSandboxField)
	case len(r.Options) > MaxSandboxOption:
		return SandboxInjectRequest{}, fmt.Errorf(`"options": at most %d`, MaxSandboxOption)
	case r.Count < 0 || r.Count > MaxSandboxCount:
		return SandboxInjectRequest{}, fmt.Errorf(`"count": 1 to %d`, MaxSandboxCount)
	case math.IsNaN(r.Rate) || r.Rate < 0 || r.Rate > MaxSandboxRate:
		return SandboxInjectRequest{}, fmt.Errorf(`"rate": messages per second, 0 (all at once) to %g`, MaxSandboxRate)
	case r.Latitude != nil && (math.IsNaN(*r.Latitude) || *r.Latitude < -90 || *r.Latitude > 90):
		return SandboxInjectRequest{}, errors.New(`"latitude": -90 to 90`)
	case r.Longitude != nil && (math.IsNaN(*r.Longitude) || *r.Longitude < -180 || *r.Longitude > 180):
		return SandboxInjectRequest{}, errors.New(`"longitude": -180 to 180`)
	}
	for _, o := range r.Options {
		if o == "" || len(o) > MaxSandboxField {
			return SandboxInjectRequest{}, fmt.Errorf(`"options": each 1 to %d bytes`, MaxSandboxField)
		}
	}
	if r.Count == 0 {
		r.Count = 1
	}
	return r, nil
}

// DecodeSandboxFault reads a P.sandbox.fault body; the kind and its fields
// are checked by the sandbox.
func DecodeSandboxFault(data []byte) (SandboxFaultRequest, error) {
	var r SandboxFaultRequest
	if err := decodeStrict(data, &r); err != nil {
		return SandboxFaultRequest{}, err
	}
	switch {
	case r.Kind == "":
		return SandboxFaultRequest{}, errors.New(`"kind" is required`)
	case len(r.Kind) > 32 || len(r.Message) > MaxSandboxField || len(r.Expire) > 32 || len(r.Duration) > 32:
		return SandboxFaultRequest{}, errors.New("a field is too long")
	case r.Code < 0 || r.Code > 999:
		return SandboxFaultRequest{}, errors.New(`"code": 0 to 999`)
	case r.Count < 0 || r.Count > 1000:
		return SandboxFaultRequest{}, errors.New(`"count": 0 to 1000`)
	}
	return r, nil
}

// DecodeSandboxOutbox reads a P.sandbox.outbox body; empty means the
// newest 20.
func DecodeSandboxOutbox(data []byte) (SandboxOutboxRequest, error) {
	r := SandboxOutboxRequest{}
	if len(bytes.TrimSpace(data)) != 0 {
		if err := decodeStrict(data, &r); err != nil {
			return SandboxOutboxRequest{}, err
		}
	}
	if r.Limit < 0 || r.Limit > MaxSandboxLimit {
		return SandboxOutboxRequest{}, fmt.Errorf(`"limit": 1 to %d`, MaxSandboxLimit)
	}
	if r.Limit == 0 {
		r.Limit = 20
	}
	return r, nil
}

// DecodeSandboxReceipt reads a P.sandbox.receipt body: exactly one of "id"
// and "ids", and "type" delivered or read. Whether the ids are messages
// the bot sent is the sandbox's to check. The request is returned with IDs
// holding every id (ID folded in).
func DecodeSandboxReceipt(data []byte) (SandboxReceiptRequest, error) {
	var r SandboxReceiptRequest
	if err := decodeStrict(data, &r); err != nil {
		return SandboxReceiptRequest{}, err
	}
	switch {
	case (r.ID == "") == (len(r.IDs) == 0):
		return SandboxReceiptRequest{}, errors.New(`exactly one of "id" (a message the bot sent) and "ids" is required`)
	case len(r.IDs) > MaxSandboxReceiptIDs:
		return SandboxReceiptRequest{}, fmt.Errorf(`"ids": at most %d`, MaxSandboxReceiptIDs)
	case r.Type != "delivered" && r.Type != "read":
		return SandboxReceiptRequest{}, errors.New(`"type": delivered or read`)
	}
	if r.ID != "" {
		r.IDs, r.ID = []string{r.ID}, ""
	}
	for _, id := range r.IDs {
		if id == "" || len(id) > MaxIDLen {
			return SandboxReceiptRequest{}, fmt.Errorf(`"id": a message id of 1 to %d bytes`, MaxIDLen)
		}
	}
	return r, nil
}

func digits(s string, lo, hi int) bool {
	if len(s) < lo || len(s) > hi {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func groupID(s string) bool {
	if len(s) == 0 || len(s) > 40 {
		return false
	}
	dash := false
	for i, c := range s {
		switch {
		case c >= '0' && c <= '9':
		case c == '-' && !dash && i > 0 && i < len(s)-1:
			dash = true
		default:
			return false
		}
	}
	return true
}
