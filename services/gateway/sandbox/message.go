package sandbox

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"

	"go.mau.fi/whatsmeow/proto/waCommon"
	"go.mau.fi/whatsmeow/proto/waE2E"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"google.golang.org/protobuf/proto"
)

// buildMessage turns a queued message into the event whatsmeow emits after
// decrypting it: Info as whatsmeow fills it for a phone-number-addressed
// message, and the waE2E message a phone sends for the type. Media fields
// (keys, hashes, paths) are made from the message id: stable, not
// downloadable.
func buildMessage(p *pending) (*events.Message, error) {
	chat, err := types.ParseJID(p.chat)
	if err != nil {
		return nil, fmt.Errorf("sandbox: inbox chat %q: %w", p.chat, err)
	}
	sender, err := types.ParseJID(p.sender)
	if err != nil {
		return nil, fmt.Errorf("sandbox: inbox sender %q: %w", p.sender, err)
	}
	seed := sha256.Sum256([]byte("media:" + p.id))
	r := rand.New(rand.NewChaCha8(seed))
	c := p.body
	info := types.MessageInfo{
		MessageSource: types.MessageSource{
			Chat: chat, Sender: sender, IsGroup: chat.Server == types.GroupServer,
			AddressingMode: types.AddressingModePN,
		},
		ID:        p.id,
		Type:      "text",
		PushName:  p.pushName,
		Timestamp: p.sentAt,
	}
	m := &waE2E.Message{}
	switch p.typ {
	case TypeText:
		m.Conversation = proto.String(c.Text)
	case TypeImage:
		info.Type, info.MediaType = "media", "image"
		m.ImageMessage = &waE2E.ImageMessage{
			URL: media(r, "jpg"), Mimetype: proto.String("image/jpeg"), Caption: optional(c.Text),
			FileSHA256: fill(r, 32), FileLength: proto.Uint64(uint64(20000 + r.IntN(200000))),
			Height: proto.Uint32(1280), Width: proto.Uint32(960), MediaKey: fill(r, 32),
			FileEncSHA256: fill(r, 32), DirectPath: directPath(r), MediaKeyTimestamp: proto.Int64(p.sentAt.Unix()),
		}
	case TypeVideo:
		info.Type, info.MediaType = "media", "video"
		m.VideoMessage = &waE2E.VideoMessage{
			URL: media(r, "mp4"), Mimetype: proto.String("video/mp4"), Caption: optional(c.Text),
			FileSHA256: fill(r, 32), FileLength: proto.Uint64(uint64(200000 + r.IntN(2000000))),
			Seconds: proto.Uint32(uint32(1 + r.IntN(60))), MediaKey: fill(r, 32), FileEncSHA256: fill(r, 32),
			DirectPath: directPath(r), MediaKeyTimestamp: proto.Int64(p.sentAt.Unix()),
		}
	case TypeAudio:
		info.Type, info.MediaType = "media", "ptt"
		m.AudioMessage = &waE2E.AudioMessage{
			URL: media(r, "ogg"), Mimetype: proto.String("audio/ogg; codecs=opus"), PTT: proto.Bool(true),
			FileSHA256: fill(r, 32), FileLength: proto.Uint64(uint64(5000 + r.IntN(50000))),
			Seconds: proto.Uint32(uint32(1 + r.IntN(30))), MediaKey: fill(r, 32), FileEncSHA256: fill(r, 32),
			DirectPath: directPath(r), MediaKeyTimestamp: proto.Int64(p.sentAt.Unix()),
		}
	case TypeDocument:
		info.Type, info.MediaType = "media", "document"
		m.DocumentMessage = &waE2E.DocumentMessage{
			URL: media(r, "enc"), Mimetype: proto.String("application/pdf"), Caption: optional(c.Text),
			Title: proto.String(c.FileName), FileName: proto.String(c.FileName),
			FileSHA256: fill(r, 32), FileLength: proto.Uint64(uint64(10000 + r.IntN(500000))),
			PageCount: proto.Uint32(uint32(1 + r.IntN(20))), MediaKey: fill(r, 32), FileEncSHA256: fill(r, 32),
			DirectPath: directPath(r), MediaKeyTimestamp: proto.Int64(p.sentAt.Unix()),
		}
	case TypeSticker:
		info.Type, info.MediaType = "media", "sticker"
		m.StickerMessage = &waE2E.StickerMessage{
			URL: media(r, "webp"), Mimetype: proto.String("image/webp"), FileSHA256: fill(r, 32),
			FileEncSHA256: fill(r, 32), MediaKey: fill(r, 32), Height: proto.Uint32(512), Width: proto.Uint32(512),
			FileLength: proto.Uint64(uint64(5000 + r.IntN(40000))), DirectPath: directPath(r),
			IsAnimated: proto.Bool(false), MediaKeyTimestamp: proto.Int64(p.sentAt.Unix()),
		}
	case TypeReaction:
		info.Type = "reaction"
		m.ReactionMessage = &waE2E.ReactionMessage{
			Key:               &waCommon.MessageKey{RemoteJID: proto.String(chat.String()), FromMe: proto.Bool(true), ID: proto.String(c.Target)},
			Text:              proto.String(c.Text),
			SenderTimestampMS: proto.Int64(p.sentAt.UnixMilli()),
		}
	case TypeLocation:
		m.LocationMessage = &waE2E.LocationMessage{
			DegreesLatitude: proto.Float64(c.Latitude), DegreesLongitude: proto.Float64(c.Longitude), Name: optional(c.Text),
		}
	case TypeContact:
		m.ContactMessage = &waE2E.ContactMessage{
			DisplayName: proto.String(c.Text),
			Vcard:       proto.String("BEGIN:VCARD\nVERSION:3.0\nFN:" + c.Text + "\nEND:VCARD"),
		}
	case TypePoll:
		info.Type = "poll"
		opts := make([]*waE2E.PollCreationMessage_Option, len(c.Options))
		for i, o := range c.Options {
			opts[i] = &waE2E.PollCreationMessage_Option{OptionName: proto.String(o)}
		}
		m.PollCreationMessageV3 = &waE2E.PollCreationMessage{Name: proto.String(c.Text), Options: opts, SelectableOptionsCount: proto.Uint32(1)}
		m.MessageContextInfo = &waE2E.MessageContextInfo{MessageSecret: pollSecret(p.id)}
	case TypeRevoke:
		m.ProtocolMessage = &waE2E.ProtocolMessage{
			Type: waE2E.ProtocolMessage_REVOKE.Enum(),
			Key:  &waCommon.MessageKey{RemoteJID: proto.String(chat.String()), FromMe: proto.Bool(false), ID: proto.String(c.Target)},
		}
	default:
		return nil, fmt.Errorf("sandbox: inbox row of unknown type %q", p.typ)
	}
	evt := &events.Message{Info: info, Message: m, RawMessage: m}
	return evt, nil
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return proto.String(s)
}

func media(r *rand.Rand, ext string) *string {
	return proto.String("https://mmg.whatsapp.net/v/t62.7118-24/" + hex.EncodeToString(fill(r, 12)) + "." + ext)
}

func directPath(r *rand.Rand) *string {
	return proto.String("/v/t62.7118-24/" + hex.EncodeToString(fill(r, 12)))
}

// pollSecret is the 32-byte secret a poll carries; votes are encrypted
// with it, so whatsmeow keeps it in the store.
func pollSecret(id string) []byte {
	s := sha256.Sum256([]byte("poll-secret:" + id))
	return s[:]
}
