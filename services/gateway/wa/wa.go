// Package wa is the whatsmeow adapter behind gateway.Conn: a whatsmeow
// client over the SQLite device store at $DATA_DIR/session.db, with
// whatsmeow's own auto-reconnect off because the gateway's supervisor owns
// reconnects.
//
// Acknowledgements wait for the gateway: SynchronousAck is on and the one
// handler is registered with AddEventHandlerWithSuccessStatus, so whatsmeow
// sends WhatsApp the ack (and delivery receipt) of a message or receipt
// only after the handler returned true, i.e. after relay stored it. The
// gateway's package doc says what whatsmeow does when it returns false.
//
// whatsmeow's decrypted event buffer is on: the plaintext of a message
// whose handlers have not yet succeeded is kept in the session store
// (whatsmeow_event_buffer), so a redelivery is dispatched again from it
// (the Signal ratchet has moved on and could not decrypt it twice), and
// only the ciphertext hash once they have, so a redelivery whose ack was
// lost is acknowledged without a dispatch (rows older than 14 days are
// pruned by whatsmeow). Snapshots of session.db can therefore hold the
// plaintext of messages in flight at that moment, or of messages relay
// could not store: one more reason backups are encrypted.
package wa

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/mdp/qrterminal/v3"
	"go.mau.fi/whatsmeow"
	"go.mau.fi/whatsmeow/proto/waE2E"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/store/sqlstore"
	"go.mau.fi/whatsmeow/types"
	waLog "go.mau.fi/whatsmeow/util/log"
	"google.golang.org/protobuf/proto"

	_ "modernc.org/sqlite" // registers the "sqlite" driver whatsmeow's sqlstore opens
)

var _ gateway.Conn = (*Client)(nil)

// Options configure Open.
type Options struct {
	// Path of the device store, normally $DATA_DIR/session.db.
	Path string
	// BotName is the name WhatsApp shows under linked devices.
	BotName string
	Log     *slog.Logger
}

// Client is a whatsmeow client that can be reset to a fresh device after a
// logout. Its methods are safe for concurrent use.
type Client struct {
	log       *slog.Logger
	wlog      waLog.Logger
	container *sqlstore.Container
	// cli and handler are atomics, not mutex-guarded: whatsmeow calls the
	// handler while holding its own handler lock, and a mutex held across
	// whatsmeow calls here could deadlock against it.
	cli     atomic.Pointer[whatsmeow.Client]
	handler atomic.Pointer[func(any) bool]
}

// DSN is the SQLite address of the device store at path: foreign keys on
// (sqlstore refuses to start without them), WAL so a snapshot can read while
// whatsmeow writes, and a busy timeout instead of SQLITE_BUSY errors.
func DSN(path string) string {
	return sqlitefile.URI(path, url.Values{"_pragma": {"foreign_keys(1)", "journal_mode(WAL)", "busy_timeout(10000)"}})
}

// Open opens (creating if needed) the device store and a client over its
// first device, or over a new device when the store has none.
func Open(ctx context.Context, o Options) (*Client, error) {
	if o.Path == "" {
		return nil, errors.New("wa: no session path")
	}
	if err := os.MkdirAll(filepath.Dir(o.Path), 0o700); err != nil {
		return nil, fmt.Errorf("wa: create data dir: %w", err)
	}
	// The store holds the device's keys: owner only, WAL and shm included.
	if err := sqlitefile.Prepare(o.Path); err != nil {
		return nil, fmt.Errorf("wa: session store: %w", err)
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.BotName != "" {
		// whatsmeow keeps the device name in a package variable; one client
		// per process, so setting it here is enough.
		v := store.DeviceProps.GetVersion()
		store.SetOSInfo(o.BotName, [3]uint32{v.GetPrimary(), v.GetSecondary(), v.GetTertiary()})
	}
	wlog := NewLogger(log)
	// sqlstore.New leaves its *sql.DB open when the upgrade fails (a stop
	// during the open cancels it): open it here and close it on every error.
	db, err := sql.Open("sqlite", DSN(o.Path))
	if err != nil {
		return nil, fmt.Errorf("wa: open session store: %w", err)
	}
	container := sqlstore.NewWithDB(db, "sqlite", wlog.Sub("Database"))
	if err := container.Upgrade(ctx); err != nil {
		_ = container.Close()
		return nil, fmt.Errorf("wa: open session store: %w", err)
	}
	device, err := container.GetFirstDevice(ctx)
	if err != nil {
		_ = container.Close()
		return nil, fmt.Errorf("wa: read device: %w", err)
	}
	c := &Client{log: log, wlog: wlog, container: container}
	c.cli.Store(c.newClient(device))
	return c, nil
}

func (c *Client) newClient(device *store.Device) *whatsmeow.Client {
	cli := whatsmeow.NewClient(device, c.wlog.Sub("Client"))
	cli.EnableAutoReconnect = false // the gateway's supervisor reconnects, with backoff
	// Keep each decrypted message in the store until the handlers are done
	// with it: WhatsApp redelivers an unacknowledged message, and without
	// the buffer whatsmeow can no longer decrypt it (the ratchet moved on:
	// ErrOldCounter) and drops it. With it, a redelivery whose handlers
	// failed is dispatched again from the buffer, and one already handled
	// is only acknowledged (the relay, issue 11, relies on this).
	cli.EnableDecryptedEventBuffer = true
	// Acknowledge a message or receipt only once the handler reported
	// success (relay stored it): false sends no ack and no receipt, and
	// WhatsApp delivers it again (see the package doc for what whatsmeow
	// does then).
	cli.SynchronousAck = true
	cli.AddEventHandlerWithSuccessStatus(c.dispatch)
	return cli
}

// dispatch is the one handler whatsmeow knows; before OnEventWithSuccess it
// reports failure, so nothing is acknowledged that nobody handled.
func (c *Client) dispatch(evt any) bool {
	if h := c.handler.Load(); h != nil {
		return (*h)(evt)
	}
	return false
}

// OnEventWithSuccess sets the handler for whatsmeow's events; its result
// is whatsmeow's handler success status (SynchronousAck: false, no ack).
func (c *Client) OnEventWithSuccess(h func(evt any) bool) { c.handler.Store(&h) }

// Connect opens the websocket. ctx also bounds whatsmeow's keepalive and
// handler loops of this socket.
func (c *Client) Connect(ctx context.Context) error {
	err := c.cli.Load().ConnectContext(ctx)
	if errors.Is(err, whatsmeow.ErrAlreadyConnected) {
		return nil
	}
	return err
}

// Disconnect closes the websocket.
func (c *Client) Disconnect() { c.cli.Load().Disconnect() }

// IsConnected reports whether the websocket is open and logged in.
func (c *Client) IsConnected() bool {
	cli := c.cli.Load()
	return cli.IsConnected() && cli.IsLoggedIn()
}

// JID is the linked device's JID, empty before pairing.
func (c *Client) JID() types.JID {
	if id := c.cli.Load().Store.ID; id != nil {
		return *id
	}
	return types.EmptyJID
}

// PairPhone asks WhatsApp for a pairing code for phone.
func (c *Client) PairPhone(ctx context.Context, phone string) (string, error) {
	// The display name must be "Browser (OS)" from WhatsApp's allowed list,
	// or the server answers 400; BOT_NAME still names the linked device.
	code, err := c.cli.Load().PairPhone(ctx, phone, true, whatsmeow.PairClientChrome, "Chrome (Linux)")
	if err != nil {
		return "", fmt.Errorf("pair phone: %w", err)
	}
	return code, nil
}

// SendText sends a plain text message.
func (c *Client) SendText(ctx context.Context, to types.JID, text string) (gateway.Sent, error) {
	resp, err := c.cli.Load().SendMessage(ctx, to, &waE2E.Message{Conversation: proto.String(text)})
	if err != nil {
		return gateway.Sent{}, fmt.Errorf("send message: %w", err)
	}
	return gateway.Sent{ID: resp.ID, Timestamp: resp.Timestamp}, nil
}

// ResetDevice starts over with a fresh device, so the next Connect shows a
// QR code. It deletes nothing: on a logout whatsmeow deletes the old device
// from the store itself, on another goroutine (setting its ID to nil), and
// touching that device here would race with it.
func (c *Client) ResetDevice(context.Context) error {
	old := c.cli.Load()
	old.Disconnect()
	old.RemoveEventHandlers()
	c.cli.Store(c.newClient(c.container.NewDevice()))
	return nil
}

// Close disconnects and closes the store, so a snapshot taken afterwards
// sees a quiet database.
func (c *Client) Close() error {
	c.cli.Load().Disconnect()
	if err := c.container.Close(); err != nil {
		return fmt.Errorf("wa: close session store: %w", err)
	}
	return nil
}

// TerminalQR returns a gateway.Deps.ShowQR that draws each code on w.
func TerminalQR(w io.Writer) func(code string) {
	return func(code string) {
		qrterminal.GenerateHalfBlock(code, qrterminal.L, w)
	}
}
