package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/riverqueue/river"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// stop ends a Run: no new requests, handlers done, River stopped (running
// jobs get StopGrace to finish, then are cancelled and snoozed: cutByStop),
// database closed. A stop that cancelled jobs is still a clean stop:
// nothing is lost, the jobs run again once relay is back.
func (s *Service) stop(subs []*nats.Subscription) error {
	s.mu.Lock()
	s.state = bus.StateStopping
	st, q := s.store, s.queue
	s.mu.Unlock()
	for _, sub := range subs {
		_ = sub.Unsubscribe()
	}
	close(s.stopping)
	s.stopDone()
	// A NATS callback may still be running after Unsubscribe: from here
	// spawn refuses what it hands over, so Add never races Wait.
	s.hmu.Lock()
	s.closed = true
	s.hmu.Unlock()
	s.handlers.Wait()
	var err error
	if q != nil {
		// Past the grace, a cancelled job has its outcome recorded in
		// well under stopRecord; only a job that ignores its context
		// (none should) would make River's stop fail.
		sctx, cancel := context.WithTimeout(context.Background(), s.cfg.StopGrace+stopRecord)
		err = q.Stop(sctx)
		cancel()
		s.putBack(q)
	}
	if st != nil {
		st.Close()
	}
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	return nil
}

// stopRecord is the time River's stop has after StopGrace to record the
// outcome of the jobs it cancelled.
const stopRecord = 5 * time.Second

// deliverJob and sendJob are the jobs River runs: deliver and workSend,
// with the end of a job that relay's stop cut short told to River as such.
func (s *Service) deliverJob(ctx context.Context, channel string, job JobInfo, a DeliveryArgs) error {
	return s.cutByStop(ctx, job, s.deliver(ctx, channel, job, a))
}

func (s *Service) sendJob(ctx context.Context, job JobInfo, a SendArgs, complete InTx) error {
	return s.cutByStop(ctx, job, s.workSend(ctx, job, a, complete))
}

// cutByStop handles a job whose context relay's stop cancelled past
// StopGrace (a webhook POST to a slow receiver, a send waiting for the
// gateway): the job did nothing wrong. Its failure becomes River's
// "stopped by the client" (context.Canceled under River's stop), which
// makes it available again with no attempt counted and no error; relay
// notes it so that putBack restores its place in its lane. A send cut
// mid-request carries its idempotency key again, which the gateway answers
// from memory if it had sent. Decisions the job made itself (dead,
// snoozed) stand.
func (s *Service) cutByStop(ctx context.Context, job JobInfo, err error) error {
	if err == nil || ctx.Err() == nil || !s.isStopping() {
		return err
	}
	var cancel *river.JobCancelError
	var snooze *river.JobSnoozeError
	if errors.As(err, &cancel) || errors.As(err, &snooze) {
		return err
	}
	s.cutMu.Lock()
	s.cuts = append(s.cuts, Cut{ID: job.ID, Due: job.ScheduledAt})
	s.cutMu.Unlock()
	return fmt.Errorf("relay stopped during the job: %w", context.Canceled)
}

// putBack restores the lane places of the jobs the stop interrupted. If
// the database refuses, nothing is lost: those jobs only run after the
// later ones of their chats.
func (s *Service) putBack(q Queue) {
	s.cutMu.Lock()
	cuts := s.cuts
	s.cuts = nil
	s.cutMu.Unlock()
	if len(cuts) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), stopRecord)
	defer cancel()
	if err := q.PutBack(ctx, cuts); err != nil {
		s.log.Warn("jobs interrupted by the stop run again after the later ones of their chats", "jobs", len(cuts), "err", err)
		return
	}
	s.log.Info("jobs interrupted by the stop put back in their places (those not taken by another relay meanwhile)", "jobs", len(cuts))
}

// isStopping reports whether Run is stopping.
func (s *Service) isStopping() bool {
	select {
	case <-s.stopping:
		return true
	default:
		return false
	}
}
