// Package storetest is the conformance suite every relay.Store passes: the
// postgres and sqlite stores run the same tests.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/riverqueue/river/rivertype"
)

// Open returns a fresh, empty store; the suite migrates and closes it.
type Open func(t *testing.T) relay.Store

// Run runs every test of the suite.
func Run(t *testing.T, open Open) {
	setup := func(t *testing.T) relay.Store {
		st := open(t)
		t.Cleanup(st.Close)
		if err := st.Migrate(context.Background()); err != nil {
			t.Fatal(err)
		}
		// Migrate is idempotent.
		if err := st.Migrate(context.Background()); err != nil {
			t.Fatalf("second migrate: %v", err)
		}
		return st
	}
	t.Run("SeqWithoutGapsUnderConcurrentInserts", func(t *testing.T) { seqNoGaps(t, setup(t)) })
	t.Run("RedeliveryStoredOnce", func(t *testing.T) { redelivery(t, setup(t)) })
	t.Run("FailedHookGivesTheSeqBack", func(t *testing.T) { failedHook(t, setup(t)) })
	t.Run("SessionsHaveTheirOwnSeq", func(t *testing.T) { sessions(t, setup(t)) })
	t.Run("ReceiptsStoredOnce", func(t *testing.T) { receipts(t, setup(t)) })
	t.Run("SendsByKey", func(t *testing.T) { sends(t, setup(t)) })
	t.Run("PruneKeepsQueuedSendsAndTheCounter", func(t *testing.T) { prune(t, setup(t)) })
	t.Run("JobsCommitAndRollBackWithTheirRow", func(t *testing.T) { jobsInTx(t, setup(t)) })
	t.Run("JobCompletionOutsideItsWorkerIsRefused", func(t *testing.T) { completeOutsideWorker(t, setup(t)) })
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func msg(session, chat, id string) relay.NewMessage {
	return relay.NewMessage{Session: session, Chat: chat, WAID: id, ReceivedAt: t0, Payload: []byte("p-" + id)}
}

func seqNoGaps(t *testing.T, st relay.Store) {
	ctx := context.Background()
	const workers, each = 8, 25
	var mu sync.Mutex
	var seqs []int64
	hooked := map[int64]int{}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				// Every worker also inserts a message another one inserts:
				// concurrent redeliveries of one message.
				id := fmt.Sprintf("m-%d-%d", w, i)
				if i%5 == 0 {
					id = fmt.Sprintf("shared-%d", i)
				}
				seq, dup, err := st.InsertMessage(ctx, msg("s", "chat-"+id, id), func(_ context.Context, tx relay.Tx, seq int64) error {
					if tx == nil {
						return errors.New("hook got no transaction")
					}
					mu.Lock()
					hooked[seq]++
					mu.Unlock()
					return nil
				})
				if err != nil {
					errs <- err
					return
				}
				if !dup {
					mu.Lock()
					seqs = append(seqs, seq)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	slices.Sort(seqs)
	want := workers*each - (workers-1)*(each/5)
	if len(seqs) != want {
		t.Fatalf("%d messages stored, want %d", len(seqs), want)
	}
	for i, s := range seqs {
		if s != int64(i+1) {
			t.Fatalf("seq %d at position %d: gap or repeat in %v", s, i, seqs)
		}
		if hooked[s] != 1 {
			t.Fatalf("hook ran %d times for committed seq %d", hooked[s], s)
		}
	}
	list, err := st.Messages(ctx, "s", 0, 1000)
	if err != nil || len(list) != want {
		t.Fatalf("Messages: %d rows, %v; want %d", len(list), err, want)
	}
	stats, err := st.Stats(ctx, "s")
	if err != nil || stats.LastSeq != int64(want) || stats.Stored != int64(want) {
		t.Fatalf("stats %+v, %v", stats, err)
	}
}

func redelivery(t *testing.T, st relay.Store) {
	ctx := context.Background()
	first, dup, err := st.InsertMessage(ctx, msg("s", "c", "A"), nil)
	if err != nil || dup {
		t.Fatalf("first insert: %d %v %v", first, dup, err)
	}
	if _, _, err := st.InsertMessage(ctx, msg("s", "c", "B"), nil); err != nil {
		t.Fatal(err)
	}
	ran := false
	again, dup, err := st.InsertMessage(ctx, msg("s", "c", "A"), func(context.Context, relay.Tx, int64) error { ran = true; return nil })
	if err != nil || !dup || again != first || ran {
		t.Fatalf("redelivery: seq %d dup %v err %v hook %v; want seq %d, dup, no hook", again, dup, err, ran, first)
	}
	// The same WhatsApp id in another chat is another message.
	other, dup, err := st.InsertMessage(ctx, msg("s", "other-chat", "A"), nil)
	if err != nil || dup || other != 3 {
		t.Fatalf("same id in another chat: %d %v %v", other, dup, err)
	}
	got, err := st.Message(ctx, "s", first)
	if err != nil || string(got.Payload) != "p-A" || got.Chat != "c" || !got.ReceivedAt.Equal(t0) {
		t.Fatalf("Message: %+v %v", got, err)
	}
	if _, err := st.Message(ctx, "s", 99); !errors.Is(err, relay.ErrNotFound) {
		t.Fatalf("missing message: %v, want ErrNotFound", err)
	}
}

func failedHook(t *testing.T, st relay.Store) {
	ctx := context.Background()
	boom := errors.New("boom")
	if _, _, err := st.InsertMessage(ctx, msg("s", "c", "A"), func(context.Context, relay.Tx, int64) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("failing hook: %v", err)
	}
	if _, err := st.Message(ctx, "s", 1); !errors.Is(err, relay.ErrNotFound) {
		t.Fatalf("row of a failed hook was kept: %v", err)
	}
	seq, _, err := st.InsertMessage(ctx, msg("s", "c", "A"), nil)
	if err != nil || seq != 1 {
		t.Fatalf("after a rolled-back insert: seq %d %v, want 1 (no gap)", seq, err)
	}
}

func sessions(t *testing.T, st relay.Store) {
	ctx := context.Background()
	for _, s := range []string{"one", "two", "one"} {
		if _, _, err := st.InsertMessage(ctx, msg(s, "c", s+time.Now().String()), nil); err != nil {
			t.Fatal(err)
		}
	}
	if list, _ := st.Messages(ctx, "two", 0, 10); len(list) != 1 || list[0].Ref != 1 {
		t.Fatalf("session two: %+v", list)
	}
	if list, _ := st.Messages(ctx, "one", 1, 10); len(list) != 1 || list[0].Ref != 2 {
		t.Fatalf("session one after 1: %+v", list)
	}
}

func receipts(t *testing.T, st relay.Store) {
	ctx := context.Background()
	r := relay.NewReceipt{Session: "s", Dedup: "d1", Chat: "c", ReceivedAt: t0, Payload: []byte("r")}
	id, dup, err := st.InsertReceipt(ctx, r, nil)
	if err != nil || dup {
		t.Fatalf("%d %v %v", id, dup, err)
	}
	again, dup, err := st.InsertReceipt(ctx, r, func(context.Context, relay.Tx, int64) error { return errors.New("must not run") })
	if err != nil || !dup || again != id {
		t.Fatalf("receipt redelivery: %d %v %v", again, dup, err)
	}
	got, err := st.Receipt(ctx, "s", id)
	if err != nil || string(got.Payload) != "r" {
		t.Fatalf("%+v %v", got, err)
	}
}

func sends(t *testing.T, st relay.Store) {
	ctx := context.Background()
	hooks := 0
	hook := func(_ context.Context, tx relay.Tx) error { hooks++; return nil }
	sd, inserted, err := st.InsertSend(ctx, "s", "k1", t0, []byte("payload"), hook)
	if err != nil || !inserted || sd.State != relay.SendQueued || hooks != 1 {
		t.Fatalf("insert: %+v %v %v hooks %d", sd, inserted, err, hooks)
	}
	again, inserted, err := st.InsertSend(ctx, "s", "k1", t0.Add(time.Minute), []byte("other"), hook)
	if err != nil || inserted || string(again.Payload) != "payload" || hooks != 1 || !again.CreatedAt.Equal(t0) {
		t.Fatalf("repeat: %+v %v %v hooks %d", again, inserted, err, hooks)
	}
	if n, err := st.CountQueuedSends(ctx, "s"); n != 1 || err != nil {
		t.Fatalf("queued: %d %v", n, err)
	}
	if _, _, err := st.InsertSend(ctx, "s", "k0", t0.Add(-time.Minute), []byte("older"), nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.InsertSend(ctx, "other", "k9", t0, []byte("other session"), nil); err != nil {
		t.Fatal(err)
	}
	if keys, err := st.QueuedSendKeys(ctx, "s"); err != nil || len(keys) != 2 || keys[0] != "k0" || keys[1] != "k1" {
		t.Fatalf("queued keys: %v %v, want k0, k1 (oldest first, this session only)", keys, err)
	}
	o := relay.Outcome{State: relay.SendSent, WAID: "3EB0", SentAt: t0.Add(time.Second), FinishedAt: t0.Add(2 * time.Second)}
	changed, err := st.FinishSend(ctx, "s", "k1", o, hook)
	if err != nil || !changed || hooks != 2 {
		t.Fatalf("finish: %v %v hooks %d", changed, err, hooks)
	}
	changed, err = st.FinishSend(ctx, "s", "k1", relay.Outcome{State: relay.SendFailed, Error: "late", FinishedAt: t0}, hook)
	if err != nil || changed || hooks != 2 {
		t.Fatalf("second finish changed the outcome: %v %v", changed, err)
	}
	got, err := st.GetSend(ctx, "s", "k1")
	if err != nil || got.State != relay.SendSent || got.Outcome.WAID != "3EB0" || !got.Outcome.SentAt.Equal(o.SentAt) || !got.Outcome.FinishedAt.Equal(o.FinishedAt) {
		t.Fatalf("outcome: %+v %v", got, err)
	}
	boom := errors.New("boom")
	if _, err := st.FinishSend(ctx, "s", "k2", o, nil); err != nil {
		t.Fatalf("finish of an unknown key: %v", err)
	}
	if keys, err := st.QueuedSendKeys(ctx, "s"); err != nil || len(keys) != 1 || keys[0] != "k0" {
		t.Fatalf("queued keys after k1 was sent: %v %v, want k0", keys, err)
	}
	if _, _, err := st.InsertSend(ctx, "s", "k3", t0, []byte("x"), func(context.Context, relay.Tx) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("failing hook: %v", err)
	}
	if _, err := st.GetSend(ctx, "s", "k3"); !errors.Is(err, relay.ErrNotFound) {
		t.Fatalf("send of a failed hook kept: %v", err)
	}
}

func prune(t *testing.T, st relay.Store) {
	ctx := context.Background()
	old, recent := t0, t0.Add(48*time.Hour)
	for i, at := range []time.Time{old, old, recent} {
		m := msg("s", "c", fmt.Sprint(i))
		m.ReceivedAt = at
		if _, _, err := st.InsertMessage(ctx, m, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := st.InsertReceipt(ctx, relay.NewReceipt{Session: "s", Dedup: "d", Chat: "c", ReceivedAt: old, Payload: []byte("r")}, nil); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"queued", "done"} {
		if _, _, err := st.InsertSend(ctx, "s", k, old, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.FinishSend(ctx, "s", "done", relay.Outcome{State: relay.SendSent, FinishedAt: old}, nil); err != nil {
		t.Fatal(err)
	}
	n, err := st.Prune(ctx, "s", t0.Add(24*time.Hour))
	if err != nil || n != 4 {
		t.Fatalf("pruned %d, %v; want 4 (2 messages, 1 receipt, 1 finished send)", n, err)
	}
	if _, err := st.GetSend(ctx, "s", "queued"); err != nil {
		t.Fatalf("a queued send was pruned: %v", err)
	}
	seq, _, err := st.InsertMessage(ctx, msg("s", "c", "new"), nil)
	if err != nil || seq != 4 {
		t.Fatalf("seq after pruning: %d %v, want 4", seq, err)
	}
	stats, err := st.Stats(ctx, "s")
	if err != nil || stats.LastSeq != 4 || stats.Stored != 2 || stats.QueuedSends != 1 {
		t.Fatalf("stats: %+v %v", stats, err)
	}
}

// jobCount sums the session's relay jobs in River's table.
func jobCount(t *testing.T, st relay.Store, session string) int64 {
	t.Helper()
	stats, err := st.Stats(context.Background(), session)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, c := range stats.Jobs {
		n += c.Count
	}
	return n
}

// jobsInTx: the Tx a store hands its hooks inserts River jobs in the
// store's own transaction, so an item and its deliveries commit together
// or not at all; before the store has a River client it refuses.
func jobsInTx(t *testing.T, st relay.Store) {
	ctx := context.Background()
	deliver := func(seq int64) []relay.Job {
		a := relay.DeliveryArgs{Session: "s", Item: relay.ItemMessage, Ref: seq, Chat: "c"}
		return []relay.Job{{Channel: relay.ChannelNATS, Delivery: a}, {Channel: relay.ChannelWebhook, Delivery: a}}
	}
	_, _, err := st.InsertMessage(ctx, msg("s", "c", "early"), func(ctx context.Context, tx relay.Tx, seq int64) error {
		return tx.InsertJobs(ctx, deliver(seq))
	})
	if err == nil {
		t.Fatal("jobs inserted before NewQueue: want an error")
	}
	if _, err := st.NewQueue(relay.QueueConfig{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.InsertMessage(ctx, msg("s", "c", "A"), func(ctx context.Context, tx relay.Tx, seq int64) error {
		return tx.InsertJobs(ctx, deliver(seq))
	}); err != nil {
		t.Fatal(err)
	}
	if n := jobCount(t, st, "s"); n != 2 {
		t.Fatalf("%d jobs after one committed message, want 2", n)
	}
	boom := errors.New("boom")
	if _, _, err := st.InsertMessage(ctx, msg("s", "c", "B"), func(ctx context.Context, tx relay.Tx, seq int64) error {
		if err := tx.InsertJobs(ctx, deliver(seq)); err != nil {
			return err
		}
		return boom
	}); !errors.Is(err, boom) {
		t.Fatalf("failing hook: %v", err)
	}
	if n := jobCount(t, st, "s"); n != 2 {
		t.Fatalf("%d jobs after a rolled-back message, want 2: its jobs outlived it", n)
	}
	if _, _, err := st.InsertSend(ctx, "s", "k", t0, []byte("x"), func(ctx context.Context, tx relay.Tx) error {
		return tx.InsertJobs(ctx, []relay.Job{{Send: &relay.SendArgs{Session: "s", Key: "k"}}})
	}); err != nil {
		t.Fatal(err)
	}
	if n := jobCount(t, st, "s"); n != 3 {
		t.Fatalf("%d jobs after a queued send, want 3", n)
	}
}

// completeOutsideWorker: completing a River job needs the job's worker
// (River finds its client in ctx); anywhere else it is an error that rolls
// the outcome back, not a panic or a silent success.
func completeOutsideWorker(t *testing.T, st relay.Store) {
	ctx := context.Background()
	if _, _, err := st.InsertSend(ctx, "s", "k", t0, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	o := relay.Outcome{State: relay.SendSent, WAID: "3EB0", FinishedAt: t0}
	_, err := st.FinishSend(ctx, "s", "k", o, func(ctx context.Context, tx relay.Tx) error {
		return tx.CompleteJob(ctx, &rivertype.JobRow{ID: 1})
	})
	if err == nil {
		t.Fatal("job completed outside its worker: want an error")
	}
	if sd, err := st.GetSend(ctx, "s", "k"); err != nil || sd.State != relay.SendQueued {
		t.Fatalf("outcome of a refused completion kept: %+v %v", sd, err)
	}
}
