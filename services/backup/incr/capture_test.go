package incr

import (
	"errors"
	"testing"
)

func TestBaseAndDeltasRestoreToTheStoreAsCaptured(t *testing.T) {
	path := newStore(t, 1<<20)
	key := testKey(1)
	ps := NewMemStore()
	c := capturer(t, path, key, ps)
	db := openDB(t, path)

	base, err := c.Base(t.Context(), 7, 1)
	if err != nil {
		t.Fatal(err)
	}
	sealed := [][]byte{keep(t, ps, base)}
	if base.Manifest.Kind != KindBase || base.Manifest.Generation != 7 || len(base.Manifest.Pages) != base.Manifest.PageCount {
		t.Fatalf("base manifest %+v", base.Manifest.Kind)
	}
	last := base.Manifest
	for i := range 5 {
		churn(t, db, 3, byte(i))
		pt := mustDelta(t, c, last)
		if pt.FullRead {
			t.Errorf("delta %d read every page", i)
		}
		if pt.Manifest.Seq != last.Seq+1 || pt.Manifest.Parent != last.ID {
			t.Errorf("delta %d: seq %d parent %s", i, pt.Manifest.Seq, pt.Manifest.Parent)
		}
		if len(pt.Manifest.Pages) == 0 || len(pt.Manifest.Pages) > 40 {
			t.Errorf("delta %d carries %d pages", i, len(pt.Manifest.Pages))
		}
		sealed = append(sealed, keep(t, ps, pt))
		last = pt.Manifest
	}
	if _, err := c.Delta(t.Context(), last, 7); !errors.Is(err, ErrNoChange) {
		t.Fatalf("delta without writes: %v", err)
	}
	dst, res, err := restoreTo(t, sealed, ps, key)
	if err != nil {
		t.Fatal(err)
	}
	if res.Point.ID != last.ID || res.Chain != 6 || len(res.Skipped) != 0 {
		t.Fatalf("restored %s chain %d skipped %v", res.Point.ID, res.Chain, res.Skipped)
	}
	if got := fileDBHash(t, dst, last.PageSize); got != last.DBHash {
		t.Fatal("restored file does not hash to the manifest")
	}
}
