package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/nats-io/nats.go"
)

// onBackupRequest handles P.backup.request.
func (s *Service) onBackupRequest(m *nats.Msg) {
	req, err := bus.DecodeBackupRequest(m.Data)
	if err != nil {
		if m.Reply != "" {
			_ = bus.Respond(m, bus.BackupReply{OK: false, Error: err.Error()})
		}
		return
	}
	s.request(req.Reason, m)
}

// request asks for a snapshot that covers now; m (when it has a reply
// subject) is answered once that snapshot is committed.
func (s *Service) request(reason string, m *nats.Msg) {
	want := m != nil && m.Reply != ""
	s.mu.Lock()
	standby := s.inStandby
	s.mu.Unlock()
	if standby {
		// The session is another instance's now: nothing of ours to store.
		if want {
			_ = bus.Respond(m, reply(outcome{Err: ErrStandby}))
		}
		return
	}
	w, gen, enqueue := s.co.add(reason, want)
	if enqueue {
		if _, q := s.backend(); q != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := q.Enqueue(ctx, reason, gen)
			cancel()
			if err != nil {
				s.log.Warn("enqueue failed; snapshot goes to the local fallback", "reason", reason, "err", err)
				s.noteErr(err)
				s.noteDB(false)
				s.kickRenewal() // probe the database until it answers, then ship the local snapshot
				s.spawn(func() { s.direct(reason) })
			}
		} else {
			s.spawn(func() { s.direct(reason) })
		}
	}
	if w == nil {
		return
	}
	spawned := s.spawn(func() {
		var o outcome
		select {
		case o = <-w.ch:
		case <-s.clock.After(s.opts.ReplyTimeout):
			s.co.remove(w)
			o = outcome{Err: errors.New("no snapshot committed within " + s.opts.ReplyTimeout.String())}
		case <-s.stopping:
			s.co.remove(w)
			o = outcome{Err: ErrStopping}
		}
		_ = bus.Respond(m, reply(o))
	})
	if !spawned {
		s.co.remove(w)
		_ = bus.Respond(m, reply(outcome{Err: ErrStopping}))
	}
}

// spawn runs f in a tracked goroutine unless Run is ending: a NATS callback
// may still be running after Unsubscribe.
func (s *Service) spawn(f func()) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.closed {
		return false
	}
	s.handlers.Go(f)
	return true
}

func reply(o outcome) bus.BackupReply {
	if o.Err != nil {
		return bus.BackupReply{OK: false, JobID: o.JobID, Error: o.Err.Error()}
	}
	ref := o.Ref
	return bus.BackupReply{OK: true, JobID: o.JobID, Snapshot: &ref, Stored: o.Where}
}

// direct takes a snapshot outside River: the database is unreachable, so it
// goes to the local fallback only.
func (s *Service) direct(reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, _ = s.snapshot(ctx, JobInfo{Reason: reason, Attempt: 1, MaxAttempts: 1}, nil, nil)
}

// work is the River worker.
func (s *Service) work(ctx context.Context, job JobInfo, complete InTx) error {
	st, _ := s.backend()
	_, err := s.snapshot(ctx, job, st, complete)
	if errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoSession) || errors.Is(err, ErrLeaseLost) {
		return nil // nothing to store (or not ours to store) is not a failure to retry
	}
	return err
}

// snapshot takes one snapshot: consistent copy, device check, sha256,
// encode, local fallback, then the database row in the same transaction as
// the job's completion (st nil: local only). It answers the requests it
// covers and publishes P.backup.done or P.backup.failed.
func (s *Service) snapshot(ctx context.Context, job JobInfo, st Store, complete InTx) (o outcome, err error) {
	select {
	case s.snapSem <- struct{}{}:
	case <-ctx.Done():
		return o, fmt.Errorf("snapshot: %w", ctx.Err())
	}
	// The semaphore covers reading, verifying and the local write only: a
	// database call that hangs must not keep the shutdown snapshot from
	// reaching the local fallback.
	semHeld := true
	unlockSem := func() {
		if semHeld {
			semHeld = false
			<-s.snapSem
		}
	}
	defer unlockSem()
	n := s.co.beginRead()
	start := s.clock.Now()
	o.JobID = job.ID
	defer func() {
		o.Err = err
		s.trackShipped(n, o)
		// Events and the heartbeat's last snapshot first, so whoever got
		// the reply finds them up to date.
		s.report(job, o, s.clock.Since(start))
		s.co.finish(n, o)
	}()

	plain, err := snapshot.ReadConsistent(ctx, s.sessionPath)
	if errors.Is(err, fs.ErrNotExist) {
		return o, ErrNoSession
	}
	if err != nil {
		return o, fmt.Errorf("read session store: %w", err)
	}
	sum := sha256.Sum256(plain)
	sha := hex.EncodeToString(sum[:])
	o.Ref = bus.SnapshotRef{Bytes: int64(len(plain)), SHA256: sha}

	var payload []byte
	var meta snapshot.Meta
	encode := func() error {
		if payload != nil {
			return nil
		}
		var err error
		if payload, meta, err = snapshot.Encode(plain, s.cfg.SessionEncryptionKey); err != nil {
			payload = nil
			return fmt.Errorf("encode snapshot: %w", err)
		}
		o.Stored = meta.Stored
		return nil
	}
	localUnchanged := false
	if files, _ := s.local.List(); len(files) > 0 && files[0].SHA256 == sha {
		localUnchanged = true
	}

	// Guarantee 5: check the copy itself, not the live file, so a logout
	// racing the read cannot slip an unlinked store in. When the store
	// changed, encoding runs meanwhile (it is needed anyway).
	var has bool
	var verr, eerr error
	var wg sync.WaitGroup
	wg.Go(func() { has, verr = snapshot.Verify(ctx, plain, s.cfg.DataDir) })
	if !localUnchanged {
		eerr = encode()
	}
	wg.Wait()
	if verr != nil {
		return o, fmt.Errorf("session store copy: %w", verr)
	}
	if !has {
		return o, ErrNoDevice
	}
	if eerr != nil {
		return o, eerr
	}

	// The local fallback before the database: if the database hangs or is
	// gone, the newest state is already on disk.
	now := s.clock.Now().UTC()
	var lerr error
	if !localUnchanged {
		if _, lerr = s.local.Write(payload, now, job.Reason, sha); lerr != nil {
			s.log.Warn("local fallback write failed", "err", lerr)
		}
	}
	if lerr == nil {
		o.Where = bus.StoredLocal
	}
	unlockSem()
	if st == nil {
		if lerr != nil {
			return o, lerr // reported: logged and published as backup.failed
		}
		o.Ref.Unchanged = localUnchanged
		return o, nil
	}
	// A quick local check; the authoritative one is inside the insert
	// transaction (the lease row must be ours and unexpired).
	if !s.holdsLease() {
		return o, ErrLeaseLost
	}
	lctx, lcancel := withTimeout(ctx, s.clock, dbCallTimeout)
	latest, err := Latest(lctx, st, s.cfg.SessionID)
	lcancel()
	if err != nil {
		s.noteDB(false)
		s.kickRenewal()
		return o, fmt.Errorf("database: %w", err)
	}
	if latest != nil && latest.SHA256 == sha {
		o.Ref.ID, o.Ref.Unchanged, o.Stored, o.Where = latest.ID, true, latest.StoredBytes, bus.StoredDatabase
		s.noteDB(true)
		return o, nil
	}
	if err := encode(); err != nil {
		return o, err
	}
	ictx, icancel := withTimeout(ctx, s.clock, insertTimeout(len(payload)))
	id, err := st.InsertSnapshot(ictx, NewSnapshot{SessionID: s.cfg.SessionID, CreatedAt: now, Reason: job.Reason,
		SHA256: sha, SizeBytes: meta.Size, StoredBytes: meta.Stored, Format: meta.Format, Payload: payload,
		LeaseHolder: s.opts.Instance, LeaseNow: s.clock.Now()}, complete)
	icancel()
	if errors.Is(err, ErrLeaseLost) {
		// Not stored. Whether another instance has the lease (standby) or
		// ours merely expired (renewed again) is the renewal loop's call.
		s.noteDB(true)
		return o, ErrLeaseLost
	}
	if err != nil {
		s.noteDB(false)
		s.kickRenewal()
		return o, err
	}
	s.noteDB(true)
	o.Ref.ID, o.Where = id, bus.StoredDatabase
	pctx, pcancel := withTimeout(ctx, s.clock, dbCallTimeout)
	defer pcancel()
	if n, err := st.Prune(pctx, s.cfg.SessionID, s.cfg.BackupRetention); err != nil {
		s.log.Warn("prune snapshots failed", "err", err)
		s.noteDB(false)
		s.kickRenewal()
	} else if n > 0 {
		s.log.Debug("pruned snapshots", "deleted", n)
	}
	return o, nil
}

func (s *Service) report(job JobInfo, o outcome, d time.Duration) {
	now := s.clock.Now()
	if o.Err != nil {
		if errors.Is(o.Err, ErrNoDevice) || errors.Is(o.Err, ErrNoSession) {
			s.log.Info("snapshot skipped", "reason", job.Reason, "why", o.Err)
			return
		}
		s.noteErr(o.Err)
		s.log.Warn("snapshot failed", "reason", job.Reason, "attempt", job.Attempt, "err", o.Err)
		ev := bus.BackupFailed{Reason: job.Reason, Error: o.Err.Error(), Attempt: job.Attempt}
		ev.Stamp(s.cfg.SessionID, now)
		_ = bus.Publish(s.opts.NC, s.subj.BackupFailed(), ev)
		return
	}
	s.mu.Lock()
	ref := o.Ref
	s.lastSnap, s.lastSnapAt = &ref, &now
	if ref.ID != 0 {
		s.lastDBSnapID = ref.ID
	}
	s.mu.Unlock()
	s.log.Info("snapshot done", "reason", job.Reason, "id", o.Ref.ID, "bytes", o.Ref.Bytes, "unchanged", o.Ref.Unchanged,
		"duration", d, "job_id", job.ID)
	ev := bus.BackupDone{SnapshotID: o.Ref.ID, Reason: job.Reason, Bytes: o.Ref.Bytes, StoredBytes: o.Stored,
		SHA256: o.Ref.SHA256, DurationMS: d.Milliseconds(), Unchanged: o.Ref.Unchanged, JobID: job.ID}
	ev.Stamp(s.cfg.SessionID, now)
	_ = bus.Publish(s.opts.NC, s.subj.BackupDone(), ev)
}

// shipLocal stores the session in the database now, outside River (its jobs
// may sit behind retries), when a snapshot reached the local fallback only:
// the database answers again, and a kill now must not lose that snapshot.
func (s *Service) shipLocal() {
	st, _ := s.backend()
	if st == nil || !s.hasUnshipped() || !s.shipping.CompareAndSwap(false, true) {
		return
	}
	spawned := s.spawn(func() {
		defer s.shipping.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		o, err := s.snapshot(ctx, JobInfo{Reason: bus.ReasonScheduled, Attempt: 1, MaxAttempts: 1}, st, nil)
		if err == nil {
			s.log.Info("the session kept in the local fallback during the database outage is in the database now", "snapshot_id", o.Ref.ID)
		} // else the next probe tries again
	})
	if !spawned {
		s.shipping.Store(false)
	}
}
