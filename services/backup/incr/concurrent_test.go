package incr

import (
	"testing"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
)

// A writer commits continuously (a row per transaction, and a Signal session rewritten in the same one) while
// points are taken, through WAL deltas, the Capturer's own checkpoints and the writer's autocheckpoints. Every point
// restores, passes integrity_check and holds a committed prefix of the writes (count == max), never fewer than the
// point before.
func TestPointsAreConsistentUnderAConcurrentWriter(t *testing.T) {
	path := newStore(t, 2<<20)
	ps := NewMemStore()
	key := testKey(9)
	c, err := Open(t.Context(), path, Options{Key: key, Pieces: ps, CheckpointFrames: 40})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w, err := wastore.StartWriter(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := w.Stop(); err != nil {
			t.Error(err)
		}
	}()
	testwait.For(t, 10e9, "first writes", func() bool { return w.Last() > 5 })

	base, err := c.Base(t.Context(), 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	sealed := [][]byte{keep(t, ps, base)}
	last := base.Manifest
	var prevMax int64
	fromWAL := 0
	for i := range 20 {
		before := w.Last()
		testwait.For(t, 10e9, "more writes", func() bool { return w.Last() > before+3 })
		pt, err := c.Delta(t.Context(), last, 1)
		if err != nil {
			t.Fatalf("delta %d: %v", i, err)
		}
		if !pt.FullRead {
			fromWAL++
		}
		upper := w.Last() + 1 // a commit may land between Delta's read and this line
		sealed = append(sealed, keep(t, ps, pt))
		last = pt.Manifest
		dst, res, err := restoreTo(t, sealed, ps, key)
		if err != nil {
			t.Fatalf("restore of delta %d: %v", i, err)
		}
		if res.Point.ID != last.ID {
			t.Fatalf("delta %d: restored %s", i, res.Point.ID)
		}
		count, maxN, err := wastore.Writes(t.Context(), dst)
		if err != nil {
			t.Fatal(err)
		}
		if count != maxN || maxN < prevMax || maxN > upper {
			t.Fatalf("delta %d holds %d rows up to %d (previous point %d, writer at %d): not a committed state", i, count, maxN, prevMax, upper)
		}
		prevMax = maxN
	}
	if fromWAL < 15 {
		t.Errorf("only %d of 20 deltas came from the WAL", fromWAL)
	}
}
