package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"github.com/blacksky-md/blacksky/internal/clockctx"
	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// The restore handshake: the gateway of our instance asks on
// P.session.restore.<instance>; each lease epoch answers once its restore is
// done, and holds the requests that come before.

// epochState is what P.session.restore answers for one lease epoch.
type epochState struct {
	done    bool
	reply   bus.RestoreReply
	pending []*nats.Msg // requests waiting for the restore
}

// maxPendingRestore bounds the requests kept while a restore runs: a
// gateway retrying on a timeout has given up on the older ones.
const maxPendingRestore = 32

// markReady records the restore's answer and answers everyone waiting.
func (s *Service) markReady(rep bus.RestoreReply) {
	rep.Instance = s.unit
	s.mu.Lock()
	ep := s.epoch
	ep.done, ep.reply = true, rep
	s.inStandby = false
	pending := ep.pending
	ep.pending = nil
	s.mu.Unlock()
	s.setState()
	for _, m := range pending {
		_ = bus.Respond(m, rep)
	}
}

func (s *Service) answerPending(rep bus.RestoreReply) {
	rep.Instance = s.unit
	s.mu.Lock()
	pending := s.epoch.pending
	s.epoch.pending = nil
	s.mu.Unlock()
	for _, m := range pending {
		_ = bus.Respond(m, rep)
	}
}

// restoreOnStart restores if needed and returns the P.session.restore
// answer. A database failure is not a verdict on the snapshots: it retries
// the database (degraded, no answer yet) and falls back to the local
// snapshots only when the database stays down for DBWait and there is local
// state. On an empty disk, answering "nothing to restore" would start the
// gateway unlinked while the session sits in the database (guarantee 1).
func (s *Service) restoreOnStart(ctx context.Context, st Store) bus.RestoreReply {
	return s.restoreRetrying(ctx, st, func(r *Restorer) (RestoreResult, error) { return r.RestoreOnStart(ctx) }, true)
}

// restoreAfterLeaseLoss restores the newest database snapshot once the
// lease is ours again: another instance used the session meanwhile, so the
// store on disk (and the local fallback) is older than the one it left.
func (s *Service) restoreAfterLeaseLoss(ctx context.Context, st Store) bus.RestoreReply {
	if st == nil {
		return bus.RestoreReply{OK: false, Error: "restore after a lost lease needs the database"}
	}
	return s.restoreRetrying(ctx, st, func(r *Restorer) (RestoreResult, error) {
		r.DatabaseOnly = true
		res, err := r.Restore(ctx, 0)
		if err == nil && !res.Restored {
			res.Source = bus.SourceExisting
		}
		return res, err
	}, false)
}

// restoreAfterTakeover is the first epoch's restore when another holder had
// the lease before us (we waited for it as standby, or took its stale row):
// it used the session meanwhile, so a store on our disk (a reused volume) is
// older than the one it left in the database, unless it is the very store of
// the newest snapshot there. With no snapshot in the database at all, the
// usual start-up restore decides.
func (s *Service) restoreAfterTakeover(ctx context.Context, st Store) bus.RestoreReply {
	cctx, cancel := clockctx.WithTimeout(ctx, s.clock, dbCallTimeout)
	latest, err := Latest(cctx, st, s.cfg.SessionID)
	var points []PointInfo
	if err == nil {
		points, err = st.ListPoints(cctx, s.cfg.SessionID, 1)
	}
	cancel()
	switch {
	case err == nil && latest == nil && len(points) == 0:
		return s.restoreOnStart(ctx, st)
	case err == nil:
		if plain, rerr := snapshot.ReadConsistent(ctx, s.sessionPath); rerr == nil {
			sum := sha256.Sum256(plain)
			// The newest of either kind: a point's database hash, or a
			// snapshot's sha256.
			same := latest != nil && hex.EncodeToString(sum[:]) == latest.SHA256
			if len(points) > 0 && (latest == nil || points[0].CreatedAt.After(latest.CreatedAt)) {
				same = pointHashOf(plain) == points[0].DBSHA256
			}
			if same {
				s.log.Info("took the session over from another instance; the store on disk is the newest snapshot's: it stays")
				return bus.RestoreReply{OK: true, Source: bus.SourceExisting}
			}
		}
	}
	s.log.Info("took the session over from another instance: restoring what it left in the database, not the store on disk")
	return s.restoreAfterLeaseLoss(ctx, st)
}

// pointHashOf is incr.DBHash of a database file's bytes (hex): what a
// point records as its database hash.
func pointHashOf(plain []byte) string {
	if len(plain) < 100 {
		return ""
	}
	pageSize := int(plain[16])<<8 | int(plain[17])
	if pageSize == 1 {
		pageSize = 65536
	}
	if pageSize < 512 || len(plain)%pageSize != 0 {
		return ""
	}
	hashes := make([]incr.Hash, 0, len(plain)/pageSize)
	for off := 0; off < len(plain); off += pageSize {
		hashes = append(hashes, sha256.Sum256(plain[off:off+pageSize]))
	}
	return incr.DBHash(pageSize, hashes).String()
}

func (s *Service) restoreRetrying(ctx context.Context, st Store, do func(*Restorer) (RestoreResult, error), localFallback bool) bus.RestoreReply {
	deadline := s.clock.Now().Add(s.cfg.DBWait)
	for n := 1; ; n++ {
		delay := restoreBackoff.Step(n)
		res, err := do(s.restorer(st))
		if err == nil || st == nil || !IsDBError(err) {
			return s.restoreReply(res, err)
		}
		s.noteErr(err)
		s.setWaitingState(bus.StateDegraded, false)
		if localFallback && !s.clock.Now().Before(deadline) && s.hasLocalState() {
			s.log.Warn("database keeps failing during restore; using the local fallback", "err", err)
			res, err = do(s.restorer(nil))
			return s.restoreReply(res, err)
		}
		s.log.Warn("database failed during restore; retrying before answering the gateway", "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return bus.RestoreReply{OK: false, Error: ErrStopping.Error()}
		case <-s.clock.After(delay):
		}
	}
}

func (s *Service) restoreReply(res RestoreResult, err error) bus.RestoreReply {
	if err != nil {
		s.log.Error("restore failed; the session store was left as it was", "err", err)
		s.noteErr(err)
		return bus.RestoreReply{OK: false, Error: err.Error()}
	}
	s.log.Info("session store ready", "restored", res.Restored, "source", res.Source, "snapshot_id", res.SnapshotID)
	return bus.RestoreReply{OK: true, Restored: res.Restored, Source: res.Source, SnapshotID: res.SnapshotID}
}

// onRestore answers P.session.restore once the restore of the current
// epoch is done. Waiting requests are kept in a bounded list, not one
// goroutine each: a gateway retrying every few seconds must not pile them up.
func (s *Service) onRestore(m *nats.Msg) {
	if m.Reply == "" {
		return
	}
	s.hmu.Lock()
	closed := s.closed
	s.hmu.Unlock()
	if closed {
		_ = bus.Respond(m, bus.RestoreReply{OK: false, Error: ErrStopping.Error(), Instance: s.unit})
		return
	}
	s.mu.Lock()
	ep := s.epoch
	if !ep.done {
		if len(ep.pending) >= maxPendingRestore {
			ep.pending = ep.pending[1:]
		}
		ep.pending = append(ep.pending, m)
		s.mu.Unlock()
		return
	}
	rep := ep.reply
	s.mu.Unlock()
	_ = bus.Respond(m, rep)
}
