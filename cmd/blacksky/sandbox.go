package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

const sandboxUsage = `usage: blacksky sandbox link | inject | fault KIND | receipt | outbox [flags]

drive the WhatsApp sandbox of a running gateway (WHATSAPP_SANDBOX=true).
It reaches the process over the bus as backup-now does (NATS_URL, else
$DATA_DIR/bus.json, else NATS_LISTEN when set).

commands:
  link     [--phone N]                        link the device now, as if the QR code was scanned
  inject   --from N [--text T] [--type T] [--group G] [--name P] [--file F]
           [--target ID] [--lat X --long Y] [--option O]... [--count N] [--rate R]
                                              an incoming message (or a flood of them)
  fault    KIND [--code N] [--message M] [--expire D] [--duration D] [--count N]
                                              make WhatsApp misbehave (see docs/sandbox.md)
  receipt  --id ID [--id ID]... [--type T]    the contact reports a sent message read (or delivered)
  outbox   [--limit N]                        the newest messages the bot sent
`

// cmdSandbox sends one request to P.sandbox.* and prints the reply.
func (m *Main) cmdSandbox(ctx context.Context, args []string) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprint(m.Stdout, sandboxUsage)
		return nil
	}
	if len(args) == 0 {
		fmt.Fprint(m.Stderr, sandboxUsage)
		return &UsageError{Msg: "sandbox: a command is required (link, inject, fault, receipt, outbox)"}
	}
	cmd, args := args[0], args[1:]
	fs := m.flags("sandbox " + cmd)
	timeout := fs.Duration("timeout", time.Minute, "how long to wait for the reply")
	var body any
	var subject func(bus.Subjects) string
	switch cmd {
	case "link":
		phone := fs.String("phone", "", "the account's phone number (digits); default: PAIR_PHONE's or one from the seed")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		body, subject = bus.SandboxLinkRequest{Phone: *phone}, bus.Subjects.SandboxLink
	case "inject":
		var r bus.SandboxInjectRequest
		var lat, long float64
		fs.StringVar(&r.From, "from", "", "the sender's phone number (digits)")
		fs.StringVar(&r.Text, "text", "", "text, caption, reaction emoji, poll question or contact name")
		fs.StringVar(&r.Type, "type", "text", "text, image, video, audio, document, sticker, reaction, location, contact, poll or revoke")
		fs.StringVar(&r.Group, "group", "", "group id: the message comes in that group instead of a direct chat")
		fs.StringVar(&r.PushName, "name", "", "the sender's push name")
		fs.StringVar(&r.FileName, "file", "", "document file name")
		fs.StringVar(&r.Target, "target", "", "reaction, revoke: the message id")
		fs.Float64Var(&lat, "lat", 0, "location latitude")
		fs.Float64Var(&long, "long", 0, "location longitude")
		fs.Func("option", "poll option (repeat)", func(s string) error { r.Options = append(r.Options, s); return nil })
		fs.IntVar(&r.Count, "count", 1, "how many messages")
		fs.Float64Var(&r.Rate, "rate", 0, "messages per second (0: all at once)")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "lat":
				r.Latitude = &lat
			case "long":
				r.Longitude = &long
			}
		})
		body, subject = r, bus.Subjects.SandboxInject
	case "fault":
		if len(args) == 0 || strings.HasPrefix(args[0], "-") {
			return &UsageError{Msg: "sandbox fault: the fault kind comes first, e.g. blacksky sandbox fault disconnect"}
		}
		r := bus.SandboxFaultRequest{Kind: args[0]}
		fs.IntVar(&r.Code, "code", 0, "temporary_ban or connect_failure code")
		fs.StringVar(&r.Message, "message", "", "connect_failure message")
		fs.StringVar(&r.Expire, "expire", "", "temporary_ban: when the ban ends, e.g. 30m")
		fs.StringVar(&r.Duration, "duration", "", "keepalive_timeout: how long pings fail, e.g. 1m")
		fs.IntVar(&r.Count, "count", 0, "send refusals: how many sends; connect_failure: how many logins fail; client_outdated: how many versions are refused (2: the offered newer one too)")
		if err := parseFlags(fs, args[1:]); err != nil {
			return err
		}
		body, subject = r, bus.Subjects.SandboxFault
	case "receipt":
		var r bus.SandboxReceiptRequest
		fs.Func("id", "the id of a message the bot sent (repeat: several sent to one contact, in one receipt)", func(s string) error {
			r.IDs = append(r.IDs, s)
			return nil
		})
		fs.StringVar(&r.Type, "type", "read", "read or delivered")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		if len(r.IDs) == 0 {
			return &UsageError{Msg: "sandbox receipt: --id is required (a message id from P.sandbox.out or blacksky sandbox outbox)"}
		}
		body, subject = r, bus.Subjects.SandboxReceipt
	case "outbox":
		limit := fs.Int("limit", 20, "how many of the newest sends")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		body, subject = bus.SandboxOutboxRequest{Limit: *limit}, bus.Subjects.SandboxOutbox
	default:
		fmt.Fprint(m.Stderr, sandboxUsage)
		return &UsageError{Msg: fmt.Sprintf("sandbox: unknown command %q", cmd)}
	}
	if *timeout <= 0 {
		return &UsageError{Msg: fmt.Sprintf("--timeout: want a positive duration such as 30s, got %s", *timeout)}
	}
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	a, err := m.setup("sandbox")
	if err != nil {
		return err
	}
	nc, target, err := a.clientBus()
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	defer nc.Close()
	rctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := waitConnected(rctx, nc, 5*time.Second); err != nil {
		return fmt.Errorf("sandbox: %w at %s", err, target.at())
	}
	subj := subject(bus.NewSubjects(a.cfg.SessionID))
	msg, err := nc.RequestWithContext(rctx, subj, data)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("sandbox: nothing answers on %s at %s%s (is the gateway running with WHATSAPP_SANDBOX=true?)", subj, target.at(), a.sessionNote(target))
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("sandbox: no reply on %s within %s at %s%s", subj, *timeout, target.at(), a.sessionNote(target))
	case err != nil:
		return fmt.Errorf("sandbox: %w (at %s)", err, target.at())
	}
	fmt.Fprintln(a.stdout, string(msg.Data))
	var rep struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("sandbox: bad reply: %w", err)
	}
	if !rep.OK {
		return fmt.Errorf("sandbox %s: %s", cmd, rep.Error)
	}
	return nil
}
