package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"

	"go.mau.fi/whatsmeow"
	"go.mau.fi/whatsmeow/store"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"go.mau.fi/whatsmeow/util/keys"
	"google.golang.org/protobuf/proto"
)

// What the store sees, done through whatsmeow's own store interfaces on the
// device (sqlstore underneath), in the order whatsmeow does it:
//
//   - a message from a contact the device has no session with is a pre-key
//     message: the contact's identity is stored, one of the device's
//     uploaded pre-keys is used up (the server hands it out once; the
//     device removes it), and a session row appears;
//   - every message (in or out) moves that contact's session row (the
//     ratchet); a group message also rewrites the sender key row;
//   - the first login uploads 812 pre-keys; when the server holds fewer
//     than whatsmeow.MinPreKeyCount, the device generates and uploads
//     whatsmeow.WantedPreKeyCount more;
//   - app state versions move at login and every appStateEvery messages.
//
// Session and sender key rows are opaque bytes of the size libsignal
// records have (growing as the ratchet turns, bounded): the sandbox does
// not run the Signal protocol, so they are not valid libsignal records.

const (
	appStateEvery = 50
	// sessionBase and sessionStep shape the session row: a base state plus
	// one archived chain every sessionTurn messages, at most sessionMaxTurns.
	sessionBase     = 420
	sessionStep     = 160
	sessionTurn     = 4
	sessionMaxTurns = 40
	senderKeyBase   = 180
)

var appStateNames = []string{"critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low"}

// afterLink is what whatsmeow stores right after pairing: the LID mapping,
// pre-keys uploaded, app state sync keys and the first versions.
func (c *Client) afterLink(ctx context.Context, dev *store.Device) error {
	if err := dev.LIDs.PutLIDMapping(ctx, dev.LID, dev.ID.ToNonAD()); err != nil {
		return fmt.Errorf("lid mapping: %w", err)
	}
	if err := c.refillPreKeys(ctx, dev, true); err != nil {
		return err
	}
	for i := range 3 {
		k := store.AppStateSyncKey{
			Data:        c.srv.seed.bytes("app-state-key", 32),
			Fingerprint: c.srv.seed.bytes("app-state-fp", 20),
			Timestamp:   c.srv.clock.Now().UnixMilli() + int64(i),
		}
		if err := dev.AppStateKeys.PutAppStateSyncKey(ctx, c.srv.seed.bytes("app-state-key-id", 6), k); err != nil {
			return fmt.Errorf("app state sync key: %w", err)
		}
	}
	for _, name := range appStateNames {
		if err := c.moveAppState(ctx, dev, name, 0); err != nil {
			return err
		}
	}
	return nil
}

// onLogin: pre-keys topped up when the server runs low, one app state
// collection synced.
func (c *Client) onLogin(ctx context.Context, dev *store.Device) error {
	if err := c.refillPreKeys(ctx, dev, false); err != nil {
		return err
	}
	return c.moveAppState(ctx, dev, "regular_low", 1)
}

// initialPreKeyCount is how many pre-keys whatsmeow uploads when neither
// the server nor the store holds any (uploadPreKeys' initialUpload: the
// first connect after pairing); later batches are WantedPreKeyCount.
const initialPreKeyCount = 812

// refillPreKeys uploads pre-keys as whatsmeow does after a login and when
// the server says it runs low: when the server or the store holds fewer
// than whatsmeow.MinPreKeyCount uploaded ones (always, when force), 812
// the first time and whatsmeow.WantedPreKeyCount after.
func (c *Client) refillPreKeys(ctx context.Context, dev *store.Device, force bool) error {
	n, err := c.srv.serverPreKeys(ctx, *dev.ID)
	if err != nil {
		return fmt.Errorf("server pre-keys: %w", err)
	}
	stored, err := dev.PreKeys.UploadedPreKeyCount(ctx)
	if err != nil {
		return fmt.Errorf("stored pre-keys: %w", err)
	}
	if !force && n >= whatsmeow.MinPreKeyCount && stored >= whatsmeow.MinPreKeyCount {
		return nil
	}
	want := uint32(whatsmeow.WantedPreKeyCount)
	if n == 0 && stored == 0 {
		want = initialPreKeyCount
	}
	batch, err := dev.PreKeys.GetOrGenPreKeys(ctx, want)
	if err != nil {
		return fmt.Errorf("generate pre-keys: %w", err)
	}
	if len(batch) == 0 {
		return nil
	}
	ids := make([]uint32, len(batch))
	for i, k := range batch {
		ids[i] = k.KeyID
	}
	if err := c.srv.uploadedPreKeys(ctx, *dev.ID, ids); err != nil {
		return fmt.Errorf("upload pre-keys: %w", err)
	}
	if err := dev.PreKeys.MarkPreKeysAsUploaded(ctx, batch[len(batch)-1].KeyID); err != nil {
		return fmt.Errorf("mark pre-keys uploaded: %w", err)
	}
	return nil
}

// moveAppState bumps a collection's version with mutations new MACs.
func (c *Client) moveAppState(ctx context.Context, dev *store.Device, name string, mutations int) error {
	v, _, err := dev.AppState.GetAppStateVersion(ctx, name)
	if err != nil {
		return fmt.Errorf("app state version: %w", err)
	}
	var hash [128]byte
	copy(hash[:], c.srv.seed.bytes("app-state-hash", 128))
	if err := dev.AppState.PutAppStateVersion(ctx, name, v+1, hash); err != nil {
		return fmt.Errorf("app state version: %w", err)
	}
	if mutations == 0 {
		return nil
	}
	macs := make([]store.AppStateMutationMAC, mutations)
	for i := range macs {
		macs[i] = store.AppStateMutationMAC{IndexMAC: c.srv.seed.bytes("index-mac", 32), ValueMAC: c.srv.seed.bytes("value-mac", 32)}
	}
	if err := dev.AppState.PutAppStateMutationMACs(ctx, name, v+1, macs); err != nil {
		return fmt.Errorf("app state mutations: %w", err)
	}
	return nil
}

// contactIdentity is a contact's identity public key, the same for the
// same seed and number in every run.
func (c *Client) contactIdentity(peer types.JID) [32]byte {
	var priv [32]byte
	copy(priv[:], fill(c.srv.seed.keyed("contact-identity:"+peer.User), 32))
	return *keys.NewKeyPairFromPrivateKey(priv).Pub
}

// session moves the device's session with peer; incoming says whether the
// first message came from peer (a pre-key message using up one of ours).
func (c *Client) session(ctx context.Context, dev *store.Device, peer types.JID, incoming bool) error {
	addr := peer.SignalAddress().String()
	old, err := dev.Sessions.GetSession(ctx, addr)
	if err != nil {
		return fmt.Errorf("read session: %w", err)
	}
	var count uint32
	if len(old) >= 4 {
		count = binary.BigEndian.Uint32(old)
	} else {
		if incoming {
			id, ok, err := c.srv.takePreKey(ctx, *dev.ID)
			if err != nil {
				return err
			}
			if ok {
				if err := dev.PreKeys.RemovePreKey(ctx, id); err != nil {
					return fmt.Errorf("use pre-key: %w", err)
				}
			}
			if err := c.refillPreKeys(ctx, dev, false); err != nil {
				return err
			}
		}
		if err := dev.Identities.PutIdentity(ctx, addr, c.contactIdentity(peer)); err != nil {
			return fmt.Errorf("store identity: %w", err)
		}
	}
	count++
	turns := min(int(count/sessionTurn), sessionMaxTurns)
	rec := c.srv.seed.bytes("session", sessionBase+turns*sessionStep)
	binary.BigEndian.PutUint32(rec, count)
	if err := dev.Sessions.PutSession(ctx, addr, rec); err != nil {
		return fmt.Errorf("store session: %w", err)
	}
	return nil
}

// receive applies to the store what decrypting p does, then builds its
// event.
func (c *Client) receive(ctx context.Context, dev *store.Device, p *pending) (*events.Message, error) {
	evt, err := buildMessage(p)
	if err != nil {
		return nil, err
	}
	info := evt.Info
	if err := c.session(ctx, dev, info.Sender, true); err != nil {
		return nil, err
	}
	if info.IsGroup {
		rec := c.srv.seed.bytes("sender-key", senderKeyBase)
		if err := dev.SenderKeys.PutSenderKey(ctx, info.Chat.String(), info.Sender.SignalAddress().String(), rec); err != nil {
			return nil, fmt.Errorf("store sender key: %w", err)
		}
	}
	if info.PushName != "" {
		if _, _, err := dev.Contacts.PutPushName(ctx, info.Sender, info.PushName); err != nil {
			return nil, fmt.Errorf("store push name: %w", err)
		}
	}
	if secret := evt.Message.GetMessageContextInfo().GetMessageSecret(); secret != nil {
		if err := dev.MsgSecrets.PutMessageSecret(ctx, info.Chat, info.Sender, info.ID, secret); err != nil {
			return nil, fmt.Errorf("store message secret: %w", err)
		}
	}
	c.mu.Lock()
	c.received++
	churn := c.received%appStateEvery == 0
	c.mu.Unlock()
	if churn {
		if err := c.moveAppState(ctx, dev, "regular_high", 3); err != nil {
			return nil, err
		}
	}
	return evt, nil
}

// deliver hands queued messages and receipts to the handler until s
// closes, as whatsmeow's one reader does: oldest due first (a message
// before a receipt due at the same time), each once per socket; one is
// acknowledged when the handler has returned (reported success) while s is
// still the open socket. Unacknowledged ones come again on the next socket.
func (c *Client) deliver(s *socket, dev *store.Device) {
	ctx := s.ctx
	msgs, rcpts := newCursor(), newCursor()
	for ctx.Err() == nil {
		now := c.srv.clock.Now()
		p, nextP, err := c.srv.nextPending(ctx, *dev.ID, msgs.at, msgs.seq, now)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("sandbox: read the queue", "err", err)
			}
			p, nextP = nil, now.Add(time.Second)
		}
		r, nextR, err := c.srv.nextReceipt(ctx, *dev.ID, rcpts.at, rcpts.seq, now)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("sandbox: read the receipts", "err", err)
			}
			r, nextR = nil, now.Add(time.Second)
		}
		switch {
		case p != nil && (r == nil || !r.deliverAt.Before(p.deliverAt)):
			msgs.move(p.deliverAt, p.seq)
			c.deliverMessage(s, dev, p)
		case r != nil:
			rcpts.move(r.deliverAt, r.seq)
			c.deliverReceipt(s, r)
		default:
			c.wait(s, earliest(nextP, nextR))
		}
	}
}

// cursor is how far one queue was delivered on a socket: the delivery time
// and seq of the last item handed over.
type cursor struct{ at, seq int64 }

func newCursor() cursor { return cursor{at: -1 << 63} }

func (cu *cursor) move(at time.Time, seq int64) { cu.at, cu.seq = at.UnixNano(), seq }

// earliest is the sooner of two due times; zero is none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}

// deliverMessage decrypts p (moving the store), dispatches it and
// acknowledges it as whatsmeow does.
func (c *Client) deliverMessage(s *socket, dev *store.Device, p *pending) {
	ctx := s.ctx
	if err := c.srv.markDelivered(ctx, p.seq); err != nil && ctx.Err() == nil {
		c.log.Warn("sandbox: count delivery", "err", err)
	}
	evt, processed, err := c.decrypt(ctx, dev, p)
	if err != nil {
		if ctx.Err() == nil {
			c.log.Warn("sandbox: receive message", "id", p.id, "err", err)
		}
		return
	}
	ok := true
	if !processed {
		ok = c.dispatch(evt)
		if ok {
			// The handlers are done with it: whatsmeow keeps only
			// the hash, so a redelivery is ignored (and acked).
			if err := dev.EventBuffer.ClearBufferedEventPlaintext(context.WithoutCancel(ctx), bufferHash(p)); err != nil {
				c.log.Warn("sandbox: clear the decrypted event", "err", err)
			}
		}
	}
	if !ok || !c.current(s) {
		return // no ack: WhatsApp sends it again after a reconnect
	}
	if err := c.srv.ack(context.WithoutCancel(ctx), p.seq); err != nil {
		c.log.Warn("sandbox: ack", "err", err)
	}
}

// deliverReceipt dispatches r as whatsmeow's handleReceipt does with
// SynchronousAck: receipts are not encrypted and leave the store alone; the
// ack waits for the handler, and a handler reporting failure leaves the
// receipt unacknowledged, so WhatsApp sends it again after a reconnect
// (there is no event buffer for receipts: it is dispatched again).
func (c *Client) deliverReceipt(s *socket, r *queuedReceipt) {
	ctx := s.ctx
	if err := c.srv.markReceiptDelivered(ctx, r.seq); err != nil && ctx.Err() == nil {
		c.log.Warn("sandbox: count receipt delivery", "err", err)
	}
	evt, err := buildReceipt(r)
	if err != nil {
		c.log.Warn("sandbox: receipt", "seq", r.seq, "err", err)
		return
	}
	if !c.dispatch(evt) || !c.current(s) {
		return
	}
	if err := c.srv.ackReceipt(context.WithoutCancel(ctx), r.seq); err != nil {
		c.log.Warn("sandbox: ack receipt", "err", err)
	}
}

// current reports whether s is still the open socket.
func (c *Client) current(s *socket) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sock == s
}

// bufferHash stands for the hash of the message's ciphertext, the key of
// whatsmeow's decrypted event buffer.
func bufferHash(p *pending) [32]byte {
	return sha256.Sum256([]byte("sandbox-ciphertext:" + p.id))
}

// decrypt is whatsmeow's bufferedDecrypt with EnableDecryptedEventBuffer
// (as package wa sets it): a message seen for the first time is decrypted
// (the store moves) and its plaintext kept in the event buffer until the
// handlers succeeded; a redelivered one whose plaintext is still buffered
// (a handler failed) is dispatched again from the buffer without
// decrypting; one already processed (only its hash left) is not
// dispatched, only acknowledged (EventAlreadyProcessed).
func (c *Client) decrypt(ctx context.Context, dev *store.Device, p *pending) (evt *events.Message, processed bool, err error) {
	hash := bufferHash(p)
	buf, err := dev.EventBuffer.GetBufferedEvent(ctx, hash)
	if err != nil {
		return nil, false, fmt.Errorf("read the event buffer: %w", err)
	}
	switch {
	case buf != nil && buf.Plaintext == nil:
		return nil, true, nil
	case buf != nil:
		evt, err := buildMessage(p)
		return evt, false, err
	}
	evt, err = c.receive(ctx, dev, p)
	if err != nil {
		return nil, false, err
	}
	plaintext, err := proto.Marshal(evt.Message)
	if err != nil {
		return nil, false, fmt.Errorf("sandbox: %w", err)
	}
	if err := dev.EventBuffer.PutBufferedEvent(ctx, hash, plaintext, p.sentAt); err != nil {
		return nil, false, fmt.Errorf("buffer the decrypted event: %w", err)
	}
	return evt, false, nil
}

// wait sleeps until next (if set), a wake-up or the socket's end.
func (c *Client) wait(s *socket, next time.Time) {
	var tc <-chan time.Time
	if !next.IsZero() {
		t := c.srv.clock.NewTimer(next.Sub(c.srv.clock.Now()))
		defer t.Stop()
		tc = t.Chan()
	}
	select {
	case <-s.ctx.Done():
	case <-s.wakeC:
	case <-tc:
	}
}
