package incr

import (
	"errors"
	"testing"
	"time"
)

func sampleManifest() Manifest {
	return Manifest{Kind: KindDelta, Generation: 3, Seq: 9, Created: time.Unix(1700000000, 5).UTC(), Parent: Hash{1},
		PageSize: 4096, PageCount: 10, DBHash: Hash{2},
		Pieces: []PieceRef{{ID: Hash{3}, Pages: 2}, {ID: Hash{4}, Pages: 1}},
		Pages:  []PageRef{{Pgno: 2, Piece: 0, Hash: Hash{5}}, {Pgno: 7, Piece: 0}, {Pgno: 10, Piece: 1}}}
}

func FuzzManifest(f *testing.F) {
	m := sampleManifest()
	f.Add(m.marshal())
	b := m.marshal()
	f.Add(b[:len(b)-1])
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseManifest(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not ErrCorrupt: %v", err)
			}
			return
		}
		// Whatever decodes re-encodes to the same bytes: no field is ignored.
		if string(m.marshal()) != string(b) {
			t.Fatal("decoded manifest does not re-encode to its input")
		}
	})
}

func FuzzPiece(f *testing.F) {
	pg := make([]byte, 512)
	f.Add(marshalPiece(512, []page{{pgno: 1, data: pg}, {pgno: 3, data: pg}}))
	f.Add([]byte(pieceMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		size, pages, err := parsePiece(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not ErrCorrupt: %v", err)
			}
			return
		}
		if string(marshalPiece(size, pages)) != string(b) {
			t.Fatal("decoded piece does not re-encode to its input")
		}
	})
}

// FuzzOpenManifest feeds sealed bytes (the catalog's, from outside) through the whole decoder with a key.
func FuzzOpenManifest(f *testing.F) {
	key := testKey(1)
	m := sampleManifest()
	sealed, err := SealManifest(&m, key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sealed)
	f.Add(sealed[:len(sealed)-3])
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := OpenManifest(b, key); err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrWrongKey) && !errors.Is(err, ErrPlaintext) {
			t.Fatalf("unexpected error: %v", err)
		}
	})
}
