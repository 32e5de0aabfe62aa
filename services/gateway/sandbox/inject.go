package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"go.mau.fi/whatsmeow/types"
)

// Message types an inject may name: every type the gateway maps on msg.in.
const (
	TypeText     = "text"
	TypeImage    = "image"
	TypeVideo    = "video"
	TypeAudio    = "audio"
	TypeDocument = "document"
	TypeSticker  = "sticker"
	TypeReaction = "reaction"
	TypeLocation = "location"
	TypeContact  = "contact"
	TypePoll     = "poll"
	TypeRevoke   = "revoke" // a protocol message: the sender deleted Target for everyone
)

// Types lists the message types in documentation order.
var Types = []string{TypeText, TypeImage, TypeVideo, TypeAudio, TypeDocument, TypeSticker,
	TypeReaction, TypeLocation, TypeContact, TypePoll, TypeRevoke}

// Content is a message's content; which fields count depends on the type.
type Content struct {
	Text      string   `json:"text,omitempty"`
	FileName  string   `json:"file_name,omitempty"`
	Target    string   `json:"target,omitempty"`
	Latitude  float64  `json:"latitude,omitempty"`
	Longitude float64  `json:"longitude,omitempty"`
	Options   []string `json:"options,omitempty"`
}

// Inject is an incoming message (Count of them, Rate per second) from the
// contact whose phone number is From, in a direct chat or in Group.
type Inject struct {
	From     string
	PushName string
	Group    string
	Type     string
	Content
	HasLocation bool // Latitude and Longitude were given
	Count       int
	Rate        float64
}

// BadRequest is a request the sandbox refuses; the bus answers ok:false
// with its text.
type BadRequest struct{ Msg string }

func (e *BadRequest) Error() string { return e.Msg }

func bad(format string, args ...any) error { return &BadRequest{Msg: fmt.Sprintf(format, args...)} }

// IsBadRequest reports whether err is the caller's fault.
func IsBadRequest(err error) bool {
	var b *BadRequest
	return errors.As(err, &b)
}

// Validate checks that the content fits the type, filling defaults.
func (in *Inject) Validate() error {
	if in.Type == "" {
		in.Type = TypeText
	}
	if in.Count == 0 {
		in.Count = 1
	}
	switch {
	case in.From == "":
		return bad("from: the sender's phone number is required")
	case in.Count < 0:
		return bad("count: at least 1")
	case in.Rate < 0 || math.IsNaN(in.Rate) || math.IsInf(in.Rate, 0):
		return bad("rate: messages per second, 0 or more")
	}
	switch in.Type {
	case TypeText:
		if in.Text == "" {
			return bad("text: required for a text message")
		}
	case TypeImage, TypeVideo, TypeAudio, TypeSticker:
	case TypeDocument:
		if in.FileName == "" {
			in.FileName = "document.pdf"
		}
	case TypeReaction:
		if in.Target == "" {
			return bad("target: the id of the message reacted to is required")
		}
	case TypeRevoke:
		if in.Target == "" {
			return bad("target: the id of the message deleted is required")
		}
	case TypeLocation:
		if !in.HasLocation {
			return bad("latitude and longitude: required for a location")
		}
	case TypeContact:
		if in.Text == "" {
			return bad("text: the shared contact's name is required")
		}
	case TypePoll:
		if in.Text == "" || len(in.Options) < 2 {
			return bad("text and options: a poll needs a question and at least two options")
		}
	default:
		return bad("type: unknown %q (want one of %s)", in.Type, strings.Join(Types, ", "))
	}
	if in.PushName == "" {
		in.PushName = "Contact " + in.From[max(0, len(in.From)-4):]
	}
	return nil
}

// Inject commits the messages to the server file (answered only once they
// are there, so a killed process still delivers them after its restart)
// and wakes the attached client. It returns the message ids.
func (s *Server) Inject(ctx context.Context, in Inject) ([]string, error) {
	if err := in.Validate(); err != nil {
		return nil, err
	}
	sender := types.NewJID(in.From, types.DefaultUserServer)
	chat := sender
	if in.Group != "" {
		chat = types.NewJID(in.Group, types.GroupServer)
	}
	body, err := json.Marshal(in.Content)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	now := s.clock.Now()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer func() { _ = tx.Rollback() }()
	// Messages go to the account's linked device; one linked later never
	// receives them.
	device, err := s.linkedDevice(ctx, tx)
	if err != nil {
		return nil, err
	}
	if device == "" {
		return nil, bad("not linked: no device is linked to receive messages (link first)")
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO contacts (phone, push_name, first_seen) VALUES (?, ?, ?)
		ON CONFLICT (phone) DO UPDATE SET push_name = excluded.push_name`, in.From, in.PushName, now.UnixNano()); err != nil {
		return nil, fmt.Errorf("sandbox: record contact: %w", err)
	}
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO inbox (id, chat, sender, push_name, type, body, sent_at, deliver_at, device) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer stmt.Close()
	ids := make([]string, 0, in.Count)
	for i := range in.Count {
		at := now
		if in.Rate > 0 {
			at = now.Add(time.Duration(float64(i) / in.Rate * float64(time.Second)))
		}
		id := s.seed.incomingID()
		// WhatsApp timestamps are whole seconds.
		if _, err := stmt.ExecContext(ctx, id, chat.String(), sender.String(), in.PushName, in.Type, string(body),
			at.Truncate(time.Second).UnixNano(), at.UnixNano(), device); err != nil {
			return nil, fmt.Errorf("sandbox: queue message: %w", err)
		}
		ids = append(ids, id)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("sandbox: queue messages: %w", err)
	}
	if c := s.current(); c != nil {
		c.wake()
	}
	return ids, nil
}
