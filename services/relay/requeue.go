package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/shared/jobs"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// requeueLost is requeueSends for pruneLoop: a failure waits for the next
// tick (or the database coming back).
func (s *Service) requeueLost(ctx context.Context) {
	if _, err := s.requeueSends(ctx); err != nil && ctx.Err() == nil {
		s.noteErr(err)
		s.log.Warn("cannot check queued sends for lost jobs; trying again later", "err", err)
	}
}

// requeueSends inserts a send job for every queued send of the session that
// has none in a live state, and returns how many. After a SIGKILL a send
// whose job was running can be left queued with no job: River's rescuer
// discards a job whose worker died on its last attempt (or of a kind its
// client has no worker for).
func (s *Service) requeueSends(ctx context.Context) (int, error) {
	st, q := s.backend()
	if st == nil || q == nil {
		return 0, errNotReady
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	keys, err := st.QueuedSendKeys(rctx, s.cfg.Session)
	s.dbResult(err)
	if err != nil {
		return 0, err
	}
	n, err := q.RequeueSends(rctx, s.cfg.Session, keys)
	if err != nil {
		return 0, err
	}
	if n > 0 {
		s.log.Warn("queued sends had no live job (lost in a crash, or discarded); queued again", "count", n)
	}
	return n, nil
}

// Live states: a job in one of them runs (again) by itself.
var liveStates = []rivertype.JobState{rivertype.JobStateAvailable, rivertype.JobStatePending, rivertype.JobStateRunning,
	rivertype.JobStateRetryable, rivertype.JobStateScheduled}

// sendJobs lists the session's send jobs in states, by key.
func (q *riverQueue[TTx]) sendJobs(ctx context.Context, session string, states ...rivertype.JobState) (map[string][]int64, error) {
	out := map[string][]int64{}
	params := river.NewJobListParams().Kinds(jobs.KindRelaySend).States(states...).First(500)
	for {
		res, err := q.client.JobList(ctx, params)
		if err != nil {
			return nil, fmt.Errorf("list send jobs: %w", err)
		}
		for _, row := range res.Jobs {
			var a SendArgs
			if err := json.Unmarshal(row.EncodedArgs, &a); err != nil || a.Session != session {
				continue
			}
			out[a.Key] = append(out[a.Key], row.ID)
		}
		if len(res.Jobs) == 0 || res.LastCursor == nil {
			return out, nil
		}
		params = params.After(res.LastCursor)
	}
}

// RequeueSends gives a queued send that lost its job a new one. A job is
// lost when River's rescuer discards the job of a worker that died (a
// SIGKILL mid-send on its last attempt) or a job ends without recording an
// outcome; the send row stays queued and nothing would ever send it. The
// queued keys are read before the jobs: a send queued in between has its
// job committed with its row, and a job that finished in between makes at
// most one extra job, which finds its send done and completes.
func (q *riverQueue[TTx]) RequeueSends(ctx context.Context, session string, queued []string) (int, error) {
	if len(queued) == 0 {
		return 0, nil
	}
	live, err := q.sendJobs(ctx, session, liveStates...)
	if err != nil {
		return 0, err
	}
	var params []river.InsertManyParams
	var keys []string
	for _, key := range queued {
		if len(live[key]) > 0 {
			continue
		}
		p, err := q.params(Job{Send: &SendArgs{Session: session, Key: key}})
		if err != nil {
			return 0, err
		}
		params = append(params, p)
		keys = append(keys, key)
	}
	if len(params) == 0 {
		return 0, nil
	}
	if _, err := q.client.InsertManyFast(ctx, params); err != nil {
		return 0, fmt.Errorf("queue sends again: %w", err)
	}
	// The dead jobs of those sends are history now: deleted, so River UI
	// and a later retry do not count them again. Failing that only leaves
	// them listed.
	dead, err := q.sendJobs(ctx, session, rivertype.JobStateDiscarded, rivertype.JobStateCancelled)
	for _, key := range keys {
		for _, id := range dead[key] {
			if err == nil {
				if _, err = q.client.JobDelete(ctx, id); errors.Is(err, rivertype.ErrNotFound) {
					err = nil
				}
			}
		}
	}
	if err != nil && q.cfg.Logger != nil {
		q.cfg.Logger.Warn("sends queued again; their dead jobs stay listed", "err", err)
	}
	return len(params), nil
}
