// Package sandbox is an offline WhatsApp behind gateway.Conn
// (WHATSAPP_SANDBOX=true): for building bots without a phone, and for
// driving the shipped binary end to end. Everything else (bus, backup,
// health, restore, lease) runs unchanged over it.
//
// # Two halves
//
// Client is the gateway's Conn. It opens $DATA_DIR/session.db through
// whatsmeow's own sqlstore exactly as package wa does (wa.DSN), and every
// change to the device store goes through whatsmeow's store interfaces on
// the device: Device.Save when linked, Identities.PutIdentity and
// Sessions.PutSession for a new contact, PutSession again for every message
// (the ratchet), PreKeys.RemovePreKey when a contact's first message uses
// one of the device's pre-keys and GetOrGenPreKeys/MarkPreKeysAsUploaded
// when the server runs low, SenderKeys for group messages, push names,
// poll secrets, AppState versions and mutation MACs at login and every 50
// messages, and Container.DeleteDevice on a logout. Snapshots, restore and
// the lease therefore work on a store that grows and churns like a real one
// (see traffic.go for what is and is not real about the rows).
//
// Server is WhatsApp's side, one per process, in its own SQLite file
// ($DATA_DIR/sandbox.db, mode 0600, WAL): the devices it linked (and logged
// out), the pre-key ids a device uploaded, the contacts it simulates, every
// incoming message until acknowledged, and every send. An inject is
// answered only after its messages are committed, so they survive a SIGKILL
// and are delivered after the restart. A store restored onto an empty disk
// (no server file) is adopted as linked, as WhatsApp's servers would still
// know the device. Faults that are about the server (ban, client outdated,
// logged out) are in the file too; dial faults and send refusals live in
// memory.
//
// # Events
//
// Events are real go.mau.fi/whatsmeow/types/events values, emitted from the
// socket's own goroutines as whatsmeow emits them from its reader:
// QR (six codes; the gateway shows the first for 60 s and each other for
// 20 s, WhatsApp's schedule, and Link refuses once they are all expired),
// PairSuccess then Connected (whatsmeow's reconnect after pairing),
// Connected on login, Message, Receipt (contacts reporting the bot's sends
// delivered or read, see Outbound), and on faults Disconnected, KeepAliveTimeout
// (on whatsmeow's ping schedule, then KeepAliveRestored), StreamReplaced,
// LoggedOut (OnConnect when the device was logged out while away),
// TemporaryBan (at every login while the ban lasts, never on an open
// socket; expiry in whole seconds), ClientOutdated (at every login presenting a version
// the server refuses; Versions is the gateway's VersionSource over it), and
// for a connect failure what whatsmeow makes of the reason (Disconnected
// for 500/503, LoggedOut for 401/403/406, else ConnectFailure), and a dial that hangs until ctx ends or the fault is
// released. Server-side closes are followed by the event only after the
// socket is closed, so the gateway's reaction finds it closed, as with
// whatsmeow.
//
// # Acknowledgement
//
// A message counts as acknowledged when the handler given to OnEvent has
// returned for it while its socket is still open (whatsmeow acks after its
// handlers ran). Each unacknowledged message is delivered once per socket;
// after a reconnect every unacknowledged one comes again, oldest due first,
// as WhatsApp redelivers. The client then behaves as whatsmeow with
// EnableDecryptedEventBuffer (package wa turns it on), through the store's
// own event buffer: a message whose handler finished but whose ack was lost
// is only acknowledged, one whose handler reported failure is dispatched
// again from the buffered plaintext. Disconnect waits for the delivery in
// progress.
//
// The gateway uses OnEventWithSuccess (its Conn method), whatsmeow's
// success-status handlers with SynchronousAck as package wa sets them: a
// message is acknowledged only when the handler returns true (relay stored
// it), and comes again after the next reconnect otherwise, dispatched from
// the buffered plaintext; once a dispatch succeeds only the hash stays.
// OnEvent is whatsmeow's plain AddEventHandler, for tests of the client.
//
// Receipts are acknowledged the same way (whatsmeow's handleReceipt acks
// after its handlers, and not when one reported failure); having no
// plaintext to buffer, an unacknowledged receipt is simply dispatched
// again after the next reconnect.
//
// # Determinism
//
// With a seed (SANDBOX_SEED; empty: the one stored in the server file, or a
// new random one stored there) message ids, QR references, pairing codes,
// the linked JID, device and contact keys, media fields and keepalive
// timing are derived from it, numbered from a boot count kept in the file so
// a restart never repeats an id. Time comes from the injected clock. The
// pre-keys whatsmeow's store generates itself (GetOrGenPreKeys) and the
// signed pre-key's signature use crypto randomness.
//
// # Outbound
//
// SendText moves the store as sending does, commits the message to the
// outbox and tells OnSent (the bus adapter publishes it as P.sandbox.out),
// then answers with a "3EB0…" id and the second-precision server time; or
// it refuses as armed by send_not_on_whatsapp / send_rate_limited (the
// refusal is recorded too).
//
// As WhatsApp does, the contact's phone then reports the message delivered:
// an accepted send to a contact commits, with the send, a delivery receipt
// due a second later (never for a group: the sandbox has no members; never
// for a refused send). Server.Receipt (P.sandbox.receipt) makes the contact
// report sends delivered or read on demand, several ids in one receipt as a
// phone reading a chat does. Receipts wait in the server file for the
// device linked when they were made and are delivered by the socket's one
// delivery loop, interleaved with incoming messages by due time, as
// events.Receipt (Chat and Sender the contact, MessageIDs, Timestamp in
// whole seconds, Type "" or "read").
//
// This package knows nothing of NATS: package sandboxbus puts Link, Inject,
// Fault, Receipt and Outbox on the bus.
package sandbox
