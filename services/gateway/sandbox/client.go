package sandbox

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/internal/sqlitefile"
	"github.com/blacksky-md/blacksky/services/gateway"
	"github.com/blacksky-md/blacksky/services/gateway/wa"
	"github.com/blacksky-md/blacksky/shared/logging"
	"go.mau.fi/whatsmeow"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/store/sqlstore"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"go.mau.fi/whatsmeow/util/keys"
)

var _ gateway.Conn = (*Client)(nil)

// QR code lifetimes as WhatsApp issues them: six references, the first
// valid for 60 s, each of the others for 20 s.
const (
	qrCodes    = 6
	firstQRTTL = 60 * time.Second
	nextQRTTL  = 20 * time.Second
)

// Options configure Server.Open.
type Options struct {
	// Path of the device store, normally $DATA_DIR/session.db.
	Path string
	Log  *slog.Logger
}

// Client is the sandbox's gateway.Conn: whatsmeow's own sqlstore over the
// device store, and a simulated socket to the Server.
type Client struct {
	srv       *Server
	log       *slog.Logger
	container *sqlstore.Container

	mu        sync.Mutex
	dev       *store.Device
	handler   func(any)
	success   func(any) bool
	sock      *socket // the open socket, or nil
	last      *socket // the newest socket, open or not: its goroutines end before a new one starts
	gen       uint64
	closed    bool
	pairPhone string
	received  uint64 // messages handled by this client, for app state churn
}

// socket is one connection: its goroutines (handshake, delivery,
// keepalive outage) end when ctx does.
type socket struct {
	gen      uint64
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	wakeC    chan struct{}
	loggedIn bool
	qrAt     time.Time
	outage   bool
	pingOK   time.Time // the last keepalive ping answered (from login on)
}

// Open opens (creating if needed) the device store through whatsmeow's
// sqlstore, exactly as wa.Open does, and attaches a client to the server.
func (s *Server) Open(ctx context.Context, o Options) (*Client, error) {
	if o.Path == "" {
		return nil, errors.New("sandbox: no session path")
	}
	if err := os.MkdirAll(filepath.Dir(o.Path), 0o700); err != nil {
		return nil, fmt.Errorf("sandbox: create data dir: %w", err)
	}
	// The store holds the device's keys: owner only, WAL and shm included.
	if err := sqlitefile.Prepare(o.Path); err != nil {
		return nil, fmt.Errorf("sandbox: session store: %w", err)
	}
	log := o.Log
	if log == nil {
		log = s.log
	}
	container, err := sqlstore.New(ctx, "sqlite", wa.DSN(o.Path), wa.NewLogger(log).Sub("Database"))
	if err != nil {
		return nil, fmt.Errorf("sandbox: open session store: %w", err)
	}
	dev, err := container.GetFirstDevice(ctx)
	if err != nil {
		_ = container.Close()
		return nil, fmt.Errorf("sandbox: read device: %w", err)
	}
	c := &Client{srv: s, log: log, container: container, dev: dev}
	if dev.ID == nil {
		c.seedKeys(dev)
	}
	s.attach(c)
	return c, nil
}

// seedKeys gives a fresh device keys from the seed, so a seeded run shows
// the same QR codes.
func (c *Client) seedKeys(dev *store.Device) {
	dev.NoiseKey = keys.NewKeyPairFromPrivateKey(c.srv.seed.key32("noise-key"))
	dev.IdentityKey = keys.NewKeyPairFromPrivateKey(c.srv.seed.key32("identity-key"))
	dev.SignedPreKey = dev.IdentityKey.CreateSignedPreKey(1)
	dev.RegistrationID = c.srv.seed.rng("registration-id").Uint32()
	dev.AdvSecretKey = c.srv.seed.bytes("adv-secret", 32)
}

// OnEvent sets the handler; a message counts as acknowledged once it
// returns (whatsmeow acks after its handlers ran).
func (c *Client) OnEvent(h func(evt any)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handler = h
}

// OnEventWithSuccess sets a handler that reports success, as whatsmeow's
// AddEventHandlerWithSuccessStatus with SynchronousAck: a message is
// acknowledged only when it returns true, and delivered again after the
// next reconnect otherwise. It replaces the OnEvent handler.
func (c *Client) OnEventWithSuccess(h func(evt any) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.success = h
}

// dispatch calls the handler synchronously; true means acknowledge.
func (c *Client) dispatch(evt any) bool {
	c.mu.Lock()
	h, hs := c.handler, c.success
	c.mu.Unlock()
	if hs != nil {
		return hs(evt)
	}
	if h != nil {
		h(evt)
	}
	return true
}

// errDialTimeout is what a hung dial ends with: after dialTimeout, or
// sooner when the sandbox is told to release it.
var errDialTimeout = errors.New("dial tcp: i/o timeout")

// dialTimeout is how long a real dial of WhatsApp's socket hangs at most
// before the TCP connect times out.
const dialTimeout = 30 * time.Second

// Connect opens the simulated socket; what WhatsApp says (QR codes, login,
// a refusal) follows as events, as with whatsmeow. A dial_hang fault makes
// it block until ctx ends, the fault is released, or 30 s (a TCP connect
// timing out) have passed.
func (c *Client) Connect(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errors.New("sandbox: client closed")
	}
	if c.sock != nil {
		c.mu.Unlock()
		return nil
	}
	last := c.last
	c.mu.Unlock()
	if last != nil {
		last.wg.Wait()
	}
	hang, fail := c.srv.takeDialFault()
	if hang != nil {
		c.log.Info("sandbox: dial hangs (fault dial_hang)")
		t := c.srv.clock.NewTimer(dialTimeout)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-hang:
			return errDialTimeout
		case <-t.Chan():
			return errDialTimeout
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("sandbox: client closed")
	}
	if c.sock != nil {
		return nil
	}
	c.gen++
	sctx, cancel := context.WithCancel(ctx)
	s := &socket{gen: c.gen, ctx: sctx, cancel: cancel, wakeC: make(chan struct{}, 1)}
	c.sock, c.last = s, s
	s.wg.Go(func() { c.handshake(s, fail) })
	return nil
}

// handshake is what the server says right after the socket opens.
func (c *Client) handshake(s *socket, fail *Fault) {
	ctx := s.ctx
	if fail != nil {
		c.connectFailure(s, fail)
		return
	}
	if out, err := c.srv.outdated(ctx); err != nil {
		c.log.Warn("sandbox: read server state", "err", err)
	} else if out {
		c.closeSocket(s, false)
		c.dispatch(&events.ClientOutdated{})
		return
	}
	if code, left, on, err := c.srv.banned(ctx); err != nil {
		c.log.Warn("sandbox: read server state", "err", err)
	} else if on {
		c.closeSocket(s, false)
		// whatsmeow reads the failure node's expire attribute, whole
		// seconds; the server rounds up, so a ban still in force is never
		// said to end now (0 reads as "no stated expiry").
		c.dispatch(&events.TemporaryBan{Code: events.TempBanReason(code), Expire: (left + time.Second - 1).Truncate(time.Second)})
		return
	}
	c.mu.Lock()
	dev := c.dev
	c.mu.Unlock()
	if dev.ID == nil {
		codes := c.qrCodes(dev)
		c.mu.Lock()
		if c.sock != s {
			c.mu.Unlock()
			return
		}
		s.qrAt = c.srv.clock.Now()
		c.mu.Unlock()
		c.dispatch(&events.QR{Codes: codes})
		return
	}
	state, err := c.srv.deviceState(ctx, *dev.ID)
	if err != nil {
		c.log.Warn("sandbox: read server state", "err", err)
		c.closeSocket(s, false)
		c.dispatch(&events.Disconnected{})
		return
	}
	switch state {
	case deviceLoggedOut:
		c.closeSocket(s, false)
		c.forget(ctx, dev)
		c.dispatch(&events.LoggedOut{OnConnect: true, Reason: events.ConnectFailureLoggedOut})
		return
	case "":
		// A store the server file has not seen: restored from a snapshot
		// onto an empty disk. WhatsApp's servers would know it; so do we.
		c.log.Info("sandbox: adopting the linked device of a restored store", "jid", logging.MaskJID(dev.ID.String()))
		if err := c.srv.setDevice(ctx, *dev.ID, deviceLinked); err != nil {
			c.log.Warn("sandbox: record device", "err", err)
		}
	}
	c.login(s, dev)
}

// connectFailure is the server answering the login with a <failure> node,
// and what whatsmeow's handleConnectFailure makes of it: 500 and 503 only
// close the socket (Disconnected; whatsmeow leaves it to auto-reconnect),
// 401, 403 and 406 are a logout (the device is deleted), any other reason
// is ConnectFailure. 402 and 405 are the temporary_ban and client_outdated
// faults.
func (c *Client) connectFailure(s *socket, fail *Fault) {
	reason := events.ConnectFailureReason(fail.Code)
	c.closeSocket(s, false)
	switch {
	case reason == events.ConnectFailureInternalServerError || reason == events.ConnectFailureServiceUnavailable:
		c.dispatch(&events.Disconnected{})
	case reason.IsLoggedOut():
		c.mu.Lock()
		dev := c.dev
		c.mu.Unlock()
		if dev.ID != nil {
			if err := c.srv.setDevice(context.WithoutCancel(s.ctx), *dev.ID, deviceLoggedOut); err != nil {
				c.log.Warn("sandbox: record logout", "err", err)
			}
		}
		c.forget(s.ctx, dev)
		c.dispatch(&events.LoggedOut{OnConnect: true, Reason: reason})
	default:
		c.dispatch(&events.ConnectFailure{Reason: reason, Message: fail.Message})
	}
}

// login completes a login on s and delivers messages until s closes.
func (c *Client) login(s *socket, dev *store.Device) {
	c.mu.Lock()
	if c.sock != s {
		c.mu.Unlock()
		return
	}
	s.loggedIn = true
	s.pingOK = c.srv.clock.Now()
	c.mu.Unlock()
	if err := c.onLogin(s.ctx, dev); err != nil && s.ctx.Err() == nil {
		c.log.Warn("sandbox: store traffic at login", "err", err)
	}
	c.dispatch(&events.Connected{})
	c.deliver(s, dev)
}

// qrCodes are WhatsApp's QR strings: ref, noise key, identity key and ADV
// secret, as whatsmeow joins them.
func (c *Client) qrCodes(dev *store.Device) []string {
	noise := base64.StdEncoding.EncodeToString(dev.NoiseKey.Pub[:])
	identity := base64.StdEncoding.EncodeToString(dev.IdentityKey.Pub[:])
	adv := base64.StdEncoding.EncodeToString(dev.AdvSecretKey)
	out := make([]string, qrCodes)
	for i := range out {
		ref := "2@" + base64.StdEncoding.EncodeToString(c.srv.seed.bytes("qr-ref", 48))
		out[i] = strings.Join([]string{ref, noise, identity, adv}, ",")
	}
	return out
}

// qrValidFor is how long the codes of one QR event stay scannable.
const qrValidFor = firstQRTTL + (qrCodes-1)*nextQRTTL

// goOn starts f as one of s's goroutines, unless s has closed already: a
// goroutine is added only while s is the open socket, so never after
// closeSocket began waiting for them.
func (c *Client) goOn(s *socket, f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sock == s {
		s.wg.Go(f)
	}
}

// closeSocket ends s; wait says whether to wait for its goroutines (never
// from one of them).
func (c *Client) closeSocket(s *socket, wait bool) {
	c.mu.Lock()
	if c.sock == s {
		c.sock = nil
	}
	c.mu.Unlock()
	s.cancel()
	if wait {
		s.wg.Wait()
	}
}

// serverClose is the server dropping the socket: the socket closes, then
// the event that tells why.
func (c *Client) serverClose(evt any) bool {
	c.mu.Lock()
	s := c.sock
	c.mu.Unlock()
	if s == nil {
		return false
	}
	c.closeSocket(s, true)
	c.dispatch(evt)
	return true
}

// wake tells the delivery loop that messages are queued.
func (c *Client) wake() {
	c.mu.Lock()
	s := c.sock
	c.mu.Unlock()
	if s != nil {
		select {
		case s.wakeC <- struct{}{}:
		default:
		}
	}
}

// Disconnect closes the socket and waits for its goroutines; no event.
func (c *Client) Disconnect() {
	c.mu.Lock()
	s := c.sock
	c.mu.Unlock()
	if s != nil {
		c.closeSocket(s, true)
	}
}

// IsConnected reports whether the socket is open and logged in.
func (c *Client) IsConnected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sock != nil && c.sock.loggedIn
}

// JID is the linked device's JID, empty before pairing.
func (c *Client) JID() types.JID {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dev.ID != nil {
		return *c.dev.ID
	}
	return types.EmptyJID
}

// PairPhone returns a linking code for phone; P.sandbox.link then links
// that number. Like WhatsApp, only while a QR code is live.
func (c *Client) PairPhone(_ context.Context, phone string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sock == nil || c.sock.qrAt.IsZero() {
		return "", fmt.Errorf("pair phone: %w", whatsmeow.ErrNotConnected)
	}
	c.pairPhone = phone
	return c.srv.seed.pairCode(), nil
}

// ResetDevice starts over with a fresh device (new keys from the seed).
// Like wa, it deletes nothing: a logout already removed the device.
func (c *Client) ResetDevice(context.Context) error {
	c.Disconnect()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dev = c.container.NewDevice()
	c.seedKeys(c.dev)
	c.pairPhone = ""
	return nil
}

// Close disconnects, detaches from the server and closes the store.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.Disconnect()
	c.srv.detach(c)
	if err := c.container.Close(); err != nil {
		return fmt.Errorf("sandbox: close session store: %w", err)
	}
	return nil
}

// forget deletes the device from the store, as whatsmeow does on a logout.
// Callers have usually just closed the socket whose context they hold: the
// delete must outlive that cancellation, or the dead device stays in the
// store and GetFirstDevice picks it again after a restart.
func (c *Client) forget(ctx context.Context, dev *store.Device) {
	if dev.ID == nil {
		return
	}
	if err := c.container.DeleteDevice(context.WithoutCancel(ctx), dev); err != nil {
		c.log.Warn("sandbox: delete the logged-out device", "err", err)
	}
	c.mu.Lock()
	dev.ID, dev.LID = nil, types.EmptyJID
	c.mu.Unlock()
}
