package backup

import "time"

// LeaseWatch is the watching half of the lease rule, the one copy shared by a
// standby backup and by `blacksky restore --force`: it follows another
// holder's lease row read after read and says when the row may be taken.
//
// A row may be taken once the watcher has itself seen it unchanged (Lease.Same)
// for Need(row) of answered reads: the longer of the watcher's own TTL and the
// TTL the holder advertises in the row (ExpiresAt - RenewedAt). That span is a
// difference of two times written by the holder on its one clock, so clock
// skew between machines does not matter; it lets a holder that renews less
// often than we do (an older release: 60 s TTL renewed every 20 s; a restore
// CLI: 10 minutes) keep its row.
//
// A read that failed, answered reads further apart than MaxGap (the watcher
// stalled), or a single read that itself took longer than MaxGap (nobody knows
// when in that span the row was read) start the watch over: a watch counts
// only time in which the watcher saw the database answer it closely.
type LeaseWatch struct {
	TTL    time.Duration // the watcher's own lease TTL: the least it watches
	MaxGap time.Duration // bound on a read's duration and on the gap between answered reads

	row        Lease
	since      time.Time // zero: no watch running
	answeredAt time.Time // the last answered read
}

// Need is how long the row must be seen unchanged before it may be taken.
func (w *LeaseWatch) Need(l Lease) time.Duration {
	return max(w.TTL, l.ExpiresAt.Sub(l.RenewedAt))
}

// Stale returns the row to offer AcquireLease as stale for a read sent at
// now: the watched row once it has stayed the same for Need of answered
// reads, else the zero Lease (no take of a held row). A gap since the last
// answered read starts the watch over first.
func (w *LeaseWatch) Stale(now time.Time) Lease {
	if !w.answeredAt.IsZero() && now.Sub(w.answeredAt) > w.MaxGap {
		w.Reset()
	}
	// The take is a compare-and-swap at or after now: when it succeeds the
	// row stayed the same from since until then.
	if w.since.IsZero() || now.Sub(w.since) < w.Need(w.row) {
		return Lease{}
	}
	return w.row
}

// Answered records a read sent at sent and answered at answered that found
// l held by another holder. renewed reports that a running watch saw the row
// change: its holder is alive.
func (w *LeaseWatch) Answered(l Lease, sent, answered time.Time) (renewed bool) {
	if answered.Sub(sent) > w.MaxGap {
		// A slow read proves nothing about the span it took (the holder may
		// have been kept from renewing meanwhile): start over from its answer.
		w.row, w.since, w.answeredAt = l, answered, answered
		return false
	}
	if !w.since.IsZero() && w.row.Same(l) {
		w.answeredAt = answered
		return false
	}
	// The row was read somewhere between sent and answered: the watch
	// counts from the answer.
	renewed = !w.since.IsZero()
	w.row, w.since, w.answeredAt = l, answered, answered
	return renewed
}

// Reset starts the watch over: a read failed, the row was released, or the
// watcher stalled.
func (w *LeaseWatch) Reset() {
	w.row, w.since, w.answeredAt = Lease{}, time.Time{}, time.Time{}
}

// Watched returns the watched row and the span it has been seen unchanged
// (since the watch began until the last answered read); zero since: none.
func (w *LeaseWatch) Watched() (row Lease, since, seen time.Time) {
	return w.row, w.since, w.answeredAt
}
