package incr

import (
	"context"
	"errors"
	"os"
	"testing"
)

// chainFixture is a base and three deltas of a small store, stored in a MemStore.
type chainFixture struct {
	path   string
	key    []byte
	ps     *MemStore
	points []*Point
	sealed [][]byte
}

func newChain(t *testing.T, gen int64) *chainFixture {
	t.Helper()
	f := &chainFixture{path: newStoreSeed(t, 1<<20, uint64(gen)), key: testKey(5), ps: NewMemStore()}
	c := capturer(t, f.path, f.key, f.ps)
	db := openDB(t, f.path)
	base, err := c.Base(t.Context(), gen, 1)
	if err != nil {
		t.Fatal(err)
	}
	f.add(t, base)
	for i := range 3 {
		churn(t, db, 3, byte(40+i))
		f.add(t, mustDelta(t, c, f.points[len(f.points)-1].Manifest))
	}
	return f
}

func (f *chainFixture) add(t *testing.T, pt *Point) {
	f.points = append(f.points, pt)
	f.sealed = append(f.sealed, keep(t, f.ps, pt))
}

// onlyPiece returns a piece only point i references.
func (f *chainFixture) onlyPiece(t *testing.T, i int) Hash {
	t.Helper()
	if len(f.points[i].Pieces) == 0 {
		t.Fatalf("point %d stored no new piece", i)
	}
	return f.points[i].Pieces[0].ID
}

func TestRestoreFallsBackPastACorruptPiece(t *testing.T) {
	f := newChain(t, 1)
	id := f.onlyPiece(t, 2)
	b, _ := f.ps.Get(t.Context(), id)
	b[len(b)-5] ^= 0xff
	f.ps.Replace(id, b)
	dst, res, err := restoreTo(t, f.sealed, f.ps, f.key)
	if err != nil {
		t.Fatal(err)
	}
	want := f.points[1].Manifest
	if res.Point.ID != want.ID || len(res.Skipped) != 2 || !errors.Is(res.Skipped[0].Reason, ErrCorrupt) {
		t.Fatalf("restored seq %d, skipped %v", res.Point.Seq, res.Skipped)
	}
	if fileDBHash(t, dst, 4096) != want.DBHash {
		t.Fatal("restored file differs from the point")
	}
}

func TestRestoreFallsBackPastAMissingPiece(t *testing.T) {
	f := newChain(t, 1)
	if err := f.ps.Delete(t.Context(), f.onlyPiece(t, 3)); err != nil {
		t.Fatal(err)
	}
	_, res, err := restoreTo(t, f.sealed, f.ps, f.key)
	if err != nil {
		t.Fatal(err)
	}
	if res.Point.ID != f.points[2].Manifest.ID || len(res.Skipped) != 1 || !errors.Is(res.Skipped[0].Reason, ErrNoPiece) {
		t.Fatalf("restored seq %d, skipped %v", res.Point.Seq, res.Skipped)
	}
}

func TestRestoreFallsBackPastATruncatedManifest(t *testing.T) {
	f := newChain(t, 1)
	f.sealed[2] = f.sealed[2][:len(f.sealed[2])/2]
	_, res, err := restoreTo(t, f.sealed, f.ps, f.key)
	if err != nil {
		t.Fatal(err)
	}
	// Point 2 cannot be read, so point 3 (its child) has no chain: point 1 is the newest that verifies.
	if res.Point.ID != f.points[1].Manifest.ID {
		t.Fatalf("restored seq %d, skipped %v", res.Point.Seq, res.Skipped)
	}
	var corrupt, broken bool
	for _, s := range res.Skipped {
		corrupt = corrupt || errors.Is(s.Reason, ErrCorrupt)
		broken = broken || errors.Is(s.Reason, ErrBrokenChain)
	}
	if !corrupt || !broken {
		t.Fatalf("skipped %v", res.Skipped)
	}
}

func TestRestoreWithTheWrongKeyStopsAndReplacesNothing(t *testing.T) {
	f := newChain(t, 1)
	dst, _, err := restoreTo(t, f.sealed, f.ps, testKey(77))
	if !errors.Is(err, ErrWrongKey) {
		t.Fatalf("restore: %v", err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target written: %v", err)
	}
	if _, _, err := restoreTo(t, f.sealed, f.ps, nil); !errors.Is(err, ErrNeedKey) {
		t.Fatalf("restore without key: %v", err)
	}
}

func TestPlaintextPointsAreRefusedUnderAKey(t *testing.T) {
	path := newStore(t, 1<<20)
	ps := NewMemStore()
	c := capturer(t, path, nil, ps)
	base, err := c.Base(t.Context(), 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	sealed := keep(t, ps, base)
	if _, _, err := restoreTo(t, [][]byte{sealed}, ps, testKey(1)); !errors.Is(err, ErrPlaintext) {
		t.Fatalf("restore: %v", err)
	}
	if _, _, err := openPayload(base.Pieces[0].Data, testKey(1)); !errors.Is(err, ErrPlaintext) {
		t.Fatalf("piece: %v", err)
	}
}

// A failed check of the assembled store (the caller's, here: no linked device) moves to the next older point and
// leaves the target alone until one passes.
func TestRestoreRunsTheCallersCheckBeforeReplacing(t *testing.T) {
	f := newChain(t, 1)
	dst := f.path + ".restored"
	if err := os.WriteFile(dst, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	calls := 0
	res, err := Restore(t.Context(), dst, f.sealed, RestoreOptions{Key: f.key, Pieces: f.ps,
		Check: func(_ context.Context, p string) error {
			calls++
			if calls < 3 {
				return errors.New("no linked device")
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Point.ID != f.points[1].Manifest.ID || fileDBHash(t, dst, 4096) != res.Point.DBHash {
		t.Fatalf("restored seq %d", res.Point.Seq)
	}
	_, err = Restore(t.Context(), dst+"2", f.sealed, RestoreOptions{Key: f.key, Pieces: f.ps,
		Check: func(context.Context, string) error { return errors.New("no linked device") }})
	if !errors.Is(err, ErrNoPoint) {
		t.Fatalf("restore with every check failing: %v", err)
	}
}

// Restore never picks a point of a lower generation when the highest one has a point that verifies, however new
// the older generation's points are; it does fall back to the lower generation when none of the highest verifies.
func TestRestorePrefersTheHighestGeneration(t *testing.T) {
	old := newChain(t, 3)
	cur := newChain(t, 4)
	ps := NewMemStore()
	for _, f := range []*chainFixture{old, cur} {
		for _, id := range f.ps.IDs() {
			b, _ := f.ps.Get(t.Context(), id)
			_ = ps.Put(t.Context(), id, b)
		}
	}
	// Generation 3's chain was captured first, but its newest point could as well be newer: only generations count.
	all := append(append([][]byte{}, old.sealed...), cur.sealed...)
	_, res, err := restoreTo(t, all, ps, old.key)
	if err != nil {
		t.Fatal(err)
	}
	if res.Point.Generation != 4 || res.Point.ID != cur.points[3].Manifest.ID {
		t.Fatalf("restored generation %d seq %d", res.Point.Generation, res.Point.Seq)
	}
	// Break every point of generation 4 (its base's pieces): generation 3's newest is next.
	for _, pc := range cur.points[0].Pieces {
		_ = ps.Delete(t.Context(), pc.ID)
	}
	_, res, err = restoreTo(t, all, ps, old.key)
	if err != nil {
		t.Fatal(err)
	}
	if res.Point.ID != old.points[3].Manifest.ID || len(res.Skipped) != 4 {
		t.Fatalf("restored generation %d seq %d, skipped %d", res.Point.Generation, res.Point.Seq, len(res.Skipped))
	}
}
