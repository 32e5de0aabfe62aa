package incr

import (
	"slices"
	"testing"
	"time"
)

func TestBaseIsDueByShareAgeOrCount(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	base := Manifest{ID: Hash{1}, Kind: KindBase, PageSize: 4096, PageCount: 100, Created: now.Add(-time.Hour), Pages: make([]PageRef, 100)}
	delta := func(id byte, pages int) Manifest {
		return Manifest{ID: Hash{id}, Kind: KindDelta, PageSize: 4096, Pages: make([]PageRef, pages)}
	}
	p := Policy{}
	if due, why := p.BaseDue([]Manifest{base, delta(2, 30), delta(3, 20)}, now); due {
		t.Fatalf("due at 50%%: %s", why)
	}
	if due, _ := p.BaseDue([]Manifest{base, delta(2, 30), delta(3, 21)}, now); !due {
		t.Fatal("not due past 50%")
	}
	if due, _ := p.BaseDue([]Manifest{base}, now.Add(23*time.Hour)); !due {
		t.Fatal("not due at 24h")
	}
	if due, _ := (Policy{MaxDeltas: 2}).BaseDue([]Manifest{base, delta(2, 1), delta(3, 1)}, now); !due {
		t.Fatal("not due after MaxDeltas")
	}
	if due, _ := p.BaseDue(nil, now); !due {
		t.Fatal("no chain, no base due")
	}
}

func TestUnreferencedListsOnlyPiecesNoRetainedChainUses(t *testing.T) {
	piece := func(b byte) PieceRef { return PieceRef{ID: Hash{b}, Pages: 1} }
	b1 := Manifest{ID: Hash{1}, Kind: KindBase, Pieces: []PieceRef{piece(10), piece(11)}}
	d1 := Manifest{ID: Hash{2}, Kind: KindDelta, Parent: b1.ID, Pieces: []PieceRef{piece(12)}}
	b2 := Manifest{ID: Hash{3}, Kind: KindBase, Pieces: []PieceRef{piece(11), piece(13)}} // 11 is shared
	d2 := Manifest{ID: Hash{4}, Kind: KindDelta, Parent: b2.ID, Pieces: []PieceRef{piece(14)}}
	all := []Manifest{b1, d1, b2, d2}
	kept, err := Closure(all, []Hash{d2.ID})
	if err != nil {
		t.Fatal(err)
	}
	if len(kept) != 2 {
		t.Fatalf("closure of d2: %d points", len(kept))
	}
	got := Unreferenced([]Hash{{10}, {11}, {12}, {13}, {14}, {99}}, kept)
	slices.SortFunc(got, func(a, b Hash) int { return int(a[0]) - int(b[0]) })
	if !slices.Equal(got, []Hash{{10}, {12}, {99}}) {
		t.Fatalf("unreferenced %v", got)
	}
	if _, err := Closure([]Manifest{d1}, []Hash{d1.ID}); err == nil {
		t.Fatal("closure without the base")
	}
}
