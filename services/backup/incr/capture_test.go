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
		if live := liveDBHash(t, path); live != last.DBHash {
			t.Fatalf("delta %d does not describe the store", i)
		}
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

// The WAL is checkpointed by the Capturer itself every CheckpointFrames; the WAL restarts after it and the deltas
// follow the new generation from its first frame without reading every page.
func TestDeltasFollowTheWALAcrossTheirOwnCheckpoints(t *testing.T) {
	path := newStore(t, 1<<20)
	ps := NewMemStore()
	c, err := Open(t.Context(), path, Options{Pieces: ps, CheckpointFrames: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	db := openDB(t, path)
	base, err := c.Base(t.Context(), 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	sealed := [][]byte{keep(t, ps, base)}
	last := base.Manifest
	salts := map[uint32]bool{}
	for i := range 12 {
		churn(t, db, 2+i%3, byte(i))
		pt := mustDelta(t, c, last)
		if pt.FullRead {
			t.Fatalf("delta %d read every page", i)
		}
		sealed = append(sealed, keep(t, ps, pt))
		last = pt.Manifest
		if live := liveDBHash(t, path); live != last.DBHash {
			t.Fatalf("delta %d does not describe the store", i)
		}
		salts[c.last.pos.salt1] = true
	}
	if len(salts) < 3 {
		t.Fatalf("the WAL restarted %d times, want several", len(salts)-1)
	}
	dst, _, err := restoreTo(t, sealed, ps, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fileDBHash(t, dst, 4096) != last.DBHash {
		t.Fatal("restored file differs")
	}
}

// Another connection's checkpoint cannot restart the WAL under the Capturer (its guard transaction holds it), so
// the next delta still comes from the WAL.
func TestForeignCheckpointDoesNotLoseTheWAL(t *testing.T) {
	path := newStore(t, 1<<20)
	ps := NewMemStore()
	c := capturer(t, path, nil, ps)
	db := openDB(t, path)
	base, err := c.Base(t.Context(), 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	last := base.Manifest
	for i := range 3 {
		churn(t, db, 3, byte(i))
		mustExec(t, db, "PRAGMA wal_checkpoint(PASSIVE)")
		churn(t, db, 2, byte(i+10))
		pt := mustDelta(t, c, last)
		if pt.FullRead {
			t.Fatalf("delta %d read every page", i)
		}
		last = pt.Manifest
		if live := liveDBHash(t, path); live != last.DBHash {
			t.Fatalf("delta %d does not describe the store", i)
		}
	}
}

// After a restart the Capturer rebuilds its page hashes from the manifests: the first delta reads every page once
// but carries only what changed; the next one is back on the WAL.
func TestResumeGivesASmallFirstDelta(t *testing.T) {
	path := newStore(t, 1<<20)
	key := testKey(3)
	ps := NewMemStore()
	db := openDB(t, path)
	c1, err := Open(t.Context(), path, Options{Key: key, Pieces: ps})
	if err != nil {
		t.Fatal(err)
	}
	base, err := c1.Base(t.Context(), 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	keep(t, ps, base)
	churn(t, db, 3, 1)
	d1, err := c1.Delta(t.Context(), base.Manifest, 1)
	if err != nil {
		t.Fatal(err)
	}
	keep(t, ps, d1)
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	churn(t, db, 3, 2)

	c2 := capturer(t, path, key, ps)
	if _, err := c2.Delta(t.Context(), d1.Manifest, 1); !errors.Is(err, ErrUnknownParent) {
		t.Fatalf("delta before resume: %v", err)
	}
	var chain []Manifest
	for _, s := range [][]byte{base.Sealed, d1.Sealed} {
		m, err := OpenManifest(s, key)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, m)
	}
	if err := c2.Resume(chain); err != nil {
		t.Fatal(err)
	}
	d2 := mustDelta(t, c2, d1.Manifest)
	if !d2.FullRead || len(d2.Manifest.Pages) > 30 {
		t.Fatalf("first delta after resume: full read %v, %d pages", d2.FullRead, len(d2.Manifest.Pages))
	}
	churn(t, db, 3, 3)
	d3 := mustDelta(t, c2, d2.Manifest)
	if d3.FullRead {
		t.Fatal("second delta after resume read every page")
	}
	if live := liveDBHash(t, path); live != d3.Manifest.DBHash {
		t.Fatal("delta does not describe the store")
	}
	// The newest delta may be lost before it is recorded: a delta on its parent is still possible.
	d3b := mustDelta(t, c2, d2.Manifest)
	if d3b.Manifest.DBHash != d3.Manifest.DBHash || d3b.Manifest.Seq != d3.Manifest.Seq {
		t.Fatal("delta on the previous point differs")
	}
}
