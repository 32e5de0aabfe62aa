// Package gateway owns the WhatsApp socket: a connection supervisor of our own
// over a small Conn interface (whatsmeow behind it, see package wa), every
// state change published on the bus, incoming messages and receipts handed
// to relay and acknowledged once stored, relay's P.gateway.send served and
// owner commands answered.
//
// # Reconnects
//
// The supervisor is the only thing that connects (whatsmeow's own
// auto-reconnect is off). A transient failure (dial error, server disconnect,
// connect failure, a login that never completes, keepalives failing for
// longer than KeepaliveMaxFail, a socket found dead by the periodic liveness
// check, QR codes running out) schedules one retry
// after backoff.Backoff.Delay(attempt) (internal/backoff): exponential with full jitter between
// RECONNECT_MIN and RECONNECT_MAX. Each retry is published as
// conn.reconnecting with attempt and delay_ms. The attempt counter resets
// once a connection has stayed up for StableAfter (60 s). Transient failures
// never stop the retries. One goroutine runs the state machine and at most
// one retry timer exists, so connect attempts never run concurrently however
// many failure events arrive at once.
//
// The reconnects counter (heartbeat details, owner status) counts retries
// scheduled after a lost or failed connection (the transient failures
// above) and nothing else: not a fresh pairing round after unscanned QR
// codes, not the re-pairing after a logout, not the waits of a stream
// replaced or a temporary ban, not a reconnect for redelivery (below; it
// has its own counter).
//
// # Terminal events
//
//   - Logged out (the phone unlinked us, or WhatsApp did): publish
//     conn.logged_out with the reason, clear the local device (fresh keys, no
//     JID) and go back to pairing after a short backoff.
//   - Stream replaced (another client holds the session): publish
//     conn.stream_replaced, disconnect, do not fight: retry only after
//     StreamReplacedWait (10 min by default).
//   - Temporary ban: publish conn.temporary_ban with code and expires_at,
//     disconnect and retry only after the ban expires (BanFallbackWait when
//     WhatsApp gives no expiry).
//   - Client outdated: publish conn.client_outdated, disconnect, fetch the
//     web version WhatsApp serves now (Deps.Versions: whatsmeow's
//     GetLatestVersion and store.SetWAVersion), present it and reconnect at
//     once; the owner is told once connected. At most once per
//     VersionRefreshEvery (1 h, injected clock): client_outdated again
//     within the hour of a fetch means the fetched version is refused too,
//     and so does WhatsApp serving the very version it refuses; then the
//     retries stop and the state stays client_outdated (health reports it
//     as unhealthy) until a newer build is deployed. A failed fetch is
//     retried by a reconnect after VersionRefreshEvery.
//   - Keepalive timeout / restored: publish; when keepalives have failed for
//     longer than KeepaliveMaxFail (3 min, whatsmeow's own threshold) the
//     socket is dropped and reconnected like any transient failure.
//   - Lease lost (conn.standby from backup while the socket is ours: another
//     instance took the session's lease, e.g. after a database outage longer
//     than the lease): close the socket and the store at once, state standby,
//     and start again from the restore handshake below. Two sockets never
//     fight over one session, and the store is reopened only after backup has
//     put the current holder's snapshot in place.
//
// # Start
//
// With backup enabled the session store is opened only after the backup
// service has answered P.session.restore with ok (state waiting_restore, or
// standby while backup reports another instance holding the lease; retried
// with backoff), so a restored snapshot is in place before whatsmeow reads
// it. While no device is linked the gateway logs "not linked: open
// <PairURL>" when the store opens and every PairHintEvery (5 min) after. Snapshots after pairing and at shutdown are the backup service's
// reaction to conn.paired and conn.stopped; conn.stopped is published only
// after the store is closed.
//
// Backup holds each P.session.restore request open until it is ready (while
// another instance still holds the lease), so a request that times out
// (RestoreTimeout, on the injected clock) is asked again at once: one
// request is always waiting and the gateway starts as soon as the lease
// frees. Only no responders, a transport error or ok:false back off, with
// the reconnect backoff capped at RestoreMaxBackoff (5 s).
//
// # Messages, receipts and relay
//
// The gateway does not publish P.msg.in: relay does, after storing (issue
// 11). Every incoming message and receipt is handed to relay with a
// P.relay.store request straight from whatsmeow's event handler, and the
// handler reports success (whatsmeow's SynchronousAck: only then does it
// send WhatsApp the ack and delivery receipt) only when relay answers ok,
// which it does after its commit. No responder (relay not running), a
// transport error, ok:false or no answer within RelayTimeout (10 s, on the
// injected clock) report failure: no ack, and WhatsApp delivers the item
// again on the next connection (which the gateway makes once relay is
// back, see below). Items so left unacknowledged are counted in the
// heartbeat (relay_unacked, last_relay_error; a retry receipt, acknowledged
// anyway, is not) and logged once when an outage begins, then at most
// once a minute while it lasts, then once when relay stores again; health's
// /readyz says relay is missing. Connection events go through the state
// machine's loop and are always acknowledged. At shutdown, handler calls in
// flight finish (at most RelayTimeout) before conn.stopped.
//
// What whatsmeow does with a failed handler (read in whatsmeow's
// message.go decryptMessages and bufferedDecrypt, receipt.go handleReceipt,
// client.go dispatchEvent, at the version in go.mod):
//   - A message: decryptMessages returns before sendMessageReceipt, so
//     neither the ack nor the delivery receipt is sent. The decrypted
//     plaintext stays in the decrypted-event buffer (whatsmeow_event_buffer,
//     keyed by the ciphertext's SHA-256; package wa turns the buffer on).
//     WhatsApp keeps the unacknowledged message and sends it again on the
//     next connection; bufferedDecrypt then finds the plaintext and
//     dispatches it again without touching the Signal ratchet (which has
//     moved on and could no longer decrypt it). Once a handler run succeeds
//     the plaintext is cleared and only the hash stays, so a redelivery
//     whose ack was lost is acknowledged without a dispatch
//     (EventAlreadyProcessed): relay is not even asked. Hashes, and the
//     plaintext of a message never handled successfully, are deleted 14
//     days after they were buffered (DeleteOldBufferedHashes, run at most
//     every 12 h; WhatsApp keeps pending messages about that long).
//   - A redelivery that can no longer be decrypted (its buffer row gone:
//     older than 14 days, or a session store restored from a snapshot taken
//     before the message was buffered while the ratchet had moved on in the
//     lost store) is logged by whatsmeow; for ErrOldCounter it is ignored
//     and acknowledged, i.e. lost without reaching relay; for other decrypt
//     errors whatsmeow sends a retry receipt (the sender's phone encrypts it
//     again and resends it, which relay stores under the same chat and id)
//     and acknowledges it, and emits events.UndecryptableMessage, which the
//     gateway logs. Snapshots carry the buffer, so a failover to a recent
//     snapshot keeps the plaintext of messages in flight.
//   - A receipt: handleReceipt's deferred ack is cancelled, so WhatsApp
//     sends the receipt again. Two exceptions: a group receipt that lists
//     several participants is acknowledged whatever the handler says
//     (whatsmeow ignores the result of each per-participant dispatch), so a
//     failed store loses those; and a "retry" receipt is acknowledged by the
//     gateway whatever relay says, because whatsmeow has already resent the
//     message it asks for and a redelivery would make it resend it again.
//   - whatsmeow runs one node handler at a time: while relay is up but not
//     answering, each incoming message holds the following ones for up to
//     RelayTimeout. A relay that is not running costs nothing (NATS answers
//     "no responders" at once).
//
// # Redelivery once relay is back
//
// WhatsApp sends an unacknowledged message or receipt again only on the
// next connection, which may be hours away. So when relay comes back while
// items of the current connection are still unacknowledged, the gateway
// reconnects once (redeliver.go): the supervisor drops the socket and
// schedules its usual retry (conn.reconnecting, then conn.connecting and
// conn.connected; no conn.disconnected), and WhatsApp redelivers them on
// the new connection. Relay counts as back after a store it confirmed (the
// next message after an outage), or on its heartbeat (P.heartbeat.relay)
// with database_ok, so a quiet chat need not wait for a new message. One
// heartbeat is believed per outage: if what it brought back is refused
// again, only a store relay confirms, or relay seen gone and back (no
// responder, or a heartbeat saying its database is down, then ok), counts
// again; a relay whose heartbeat says ok while its stores keep failing
// costs one reconnect, not one a minute.
//
// Bounds: at most one such reconnect per RedeliverEvery (1 min, injected
// clock); relay back again within the minute waits on a timer for the
// minute to be over and then reconnects once, so a flapping relay never
// makes the socket flap and nothing refused meanwhile waits for a drop.
// Only from "connected": pairing has no messages, standby and stopping
// have no socket, and any other state is already on its way to a new
// connection, which redelivers by itself (the count of unacknowledged
// items starts again at each connect; the liveness check asks again, so a
// signal that came while connecting is not lost). It is logged once
// ("relay is back: reconnecting so WhatsApp redelivers N unacknowledged
// messages and receipts") and counted in the heartbeat
// (relay_redelivery_reconnects), not in reconnects. An owner reply the
// worker sends during those seconds is dropped as during any reconnect.
//
// An owner command runs once per message: only after relay stored the
// message for the first time (not on a Duplicate redelivery, not when the
// store failed and the message will come again).
//
// # Sends
//
// Relay answers the bots' P.msg.send, queues each send and paces the queue
// by SEND_RATE; it asks the gateway to put one message on the socket with
// P.gateway.send (body and answer as P.msg.send's, which only our services
// may publish or hear). The gateway answers ok:false for bad JSON, an
// unknown recipient form, no connection or shutdown under way, and
// otherwise sends at once: it does not refuse or delay a send relay has
// paced. SEND_RATE's limiter stays in the gateway only for what it sends on
// its own: owner replies and alerts take their slots from it and may wait
// up to OwnerSendWait (1 min), one at a time (a later slot drops the reply,
// logged); each relay send takes a token without waiting, so owner replies
// queue behind relay's sends rather than doubling the rate.
//
// A send's idempotency key is remembered once it went out (sentKeys: in
// memory, the last 10,000 keys for 24 hours): relay asks again with the
// same key when it died before recording the outcome, and the repeat is
// answered with the first answer instead of sent twice; a repeat of a key
// still sending waits for it. A gateway restart forgets the keys, which is
// the double-send window left.
//
// At shutdown new sends are refused ("shutting down"; relay keeps them
// queued), and sends in flight get a grace period of min(SendTimeout,
// ShutdownSendGrace) to be answered truthfully before the socket closes.
//
// Messages from OWNER_NUMBER (by phone JID, or by LID with the phone JID as
// SenderAlt) starting with PREFIX run ping, status and backup; the owner is
// also told when the bot is back after more than OfflineAlertAfter (5 min)
// offline.
package gateway
