package incr

import (
	"errors"
	"reflect"
	"testing"
)

func TestManifestSealsAndOpensToTheSameValue(t *testing.T) {
	m := sampleManifest()
	key := testKey(2)
	sealed, err := SealManifest(&m, key)
	if err != nil {
		t.Fatal(err)
	}
	got, err := OpenManifest(sealed, key)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("got %+v\nwant %+v", got, m)
	}
	if id, err := PeekID(sealed); err != nil || id != m.ID {
		t.Fatalf("PeekID %s %v, want %s", id, err, m.ID)
	}
	if _, err := OpenManifest(sealed, testKey(3)); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("wrong key: %v", err)
	}
}

func TestManifestDecoderRefusesInconsistentTables(t *testing.T) {
	for name, mut := range map[string]func(*Manifest){
		"page out of order":     func(m *Manifest) { m.Pages[1].Pgno = 2 },
		"page beyond the count": func(m *Manifest) { m.Pages[2].Pgno = 11 },
		"unknown piece":         func(m *Manifest) { m.Pages[2].Piece = 5 },
		"piece count mismatch":  func(m *Manifest) { m.Pieces[0].Pages = 3 },
		"delta without parent":  func(m *Manifest) { m.Parent = Hash{} },
		"base missing pages":    func(m *Manifest) { m.Kind = KindBase; m.Parent = Hash{} },
		"odd page size":         func(m *Manifest) { m.PageSize = 4000 },
		"database over the cap": func(m *Manifest) { m.PageCount = MaxDBSize/4096 + 1 },
		"unknown kind":          func(m *Manifest) { m.Kind = 9 },
		"piece over page limit": func(m *Manifest) { m.Pieces[1].Pages = MaxPiecePages + 1 },
	} {
		m := sampleManifest()
		mut(&m)
		if _, err := parseManifest(m.marshal()); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
	sm := sampleManifest()
	b := sm.marshal()
	if _, err := parseManifest(append(b, 0)); !errors.Is(err, ErrCorrupt) {
		t.Errorf("trailing byte: %v", err)
	}
	if _, err := parseManifest(b[:len(b)-1]); !errors.Is(err, ErrCorrupt) {
		t.Errorf("truncated: %v", err)
	}
}

func TestPieceIsCheckedAgainstItsID(t *testing.T) {
	pg := make([]byte, 512)
	plain := marshalPiece(512, []page{{pgno: 4, data: pg}})
	other := marshalPiece(512, []page{{pgno: 5, data: pg}})
	sealed, _, err := snapshotEncode(other, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := openPiece(sha(plain), sealed, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a piece stored under another's id: %v", err)
	}
	if _, pages, err := openPiece(sha(other), sealed, nil); err != nil || len(pages) != 1 || pages[0].pgno != 5 {
		t.Fatalf("open: %v", err)
	}
}
