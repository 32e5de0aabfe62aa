// Package gateway owns the WhatsApp socket: a connection supervisor of our own
// over a small Conn interface (whatsmeow behind it, see package wa), every
// state change published on the bus, P.msg.send served and owner commands
// answered.
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
// replaced or a temporary ban.
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
// # Messages and owner commands
//
// Every incoming message is published on P.msg.in straight from whatsmeow's
// event handler (conversion and a NATS publish never block): whatsmeow has
// acked the message to WhatsApp before we see it, so it must not wait in a
// queue that a shutdown or an overflow could lose. Only connection events go
// through the state machine's loop; owner commands go to a worker. At
// shutdown, handler calls in flight finish before conn.stopped.
//
// P.msg.send is answered ok:false for bad JSON, an unknown recipient form,
// no connection, shutdown under way, or SEND_RATE: "N/period" means at most
// N+1 sends in any window of one period (a token bucket of burst 1). A send
// whose slot is at most SendWait (5 s) away waits for it; a later slot, or
// more than MaxSendWaiters (64) sends already waiting, is refused with the
// time to the next slot. Owner replies and alerts take their slots from the
// same limiter and may wait up to OwnerSendWait (1 min), one at a time; a
// later slot drops the reply (logged).
//
// At shutdown new sends are refused ("shutting down"), sends still waiting
// for a slot are refused (they never reached WhatsApp), and sends in flight
// get a grace period of min(SendTimeout, ShutdownSendGrace) to be answered
// truthfully before the socket closes.
//
// Messages from OWNER_NUMBER (by phone JID, or by LID with the phone JID as
// SenderAlt) starting with PREFIX run ping, status and backup; the owner is
// also told when the bot is back after more than OfflineAlertAfter (5 min)
// offline.
package gateway
