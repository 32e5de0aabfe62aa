package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup"
)

func pieceID(n int) string { return fmt.Sprintf("%064x", 1000+n) }

func piece(n int) backup.NewPiece {
	return backup.NewPiece{ID: pieceID(n), Data: bytes.Repeat([]byte{byte(n)}, 50+n)}
}

// point builds a point of session with the given new pieces and references.
func point(session string, gen, seq int64, kind string, n int, pieces []backup.NewPiece, refs ...int) backup.NewPoint {
	p := backup.NewPoint{PointInfo: backup.PointInfo{SessionID: session, Generation: gen, Seq: seq, Kind: kind,
		ManifestID: fmt.Sprintf("%064x", n), CreatedAt: t0.Add(time.Duration(n) * time.Second), Reason: "sync",
		DBSHA256: fmt.Sprintf("%064x", 9000+n), SizeBytes: 4096 * int64(n), StoredBytes: int64(10 + n)},
		Manifest: bytes.Repeat([]byte{'m', byte(n)}, 20), Pieces: pieces}
	if kind == backup.PointDelta {
		p.Parent = fmt.Sprintf("%064x", n-1)
	}
	for _, r := range refs {
		p.Refs = append(p.Refs, pieceID(r))
	}
	return p
}

// testLeaseGenerations: a new holder gets the next generation in the take
// itself, a renewal keeps it, and a row taken fresh after a release starts
// above every generation the session's points were written under.
func testLeaseGenerations(t *testing.T, s backup.Store) {
	ctx := context.Background()
	none := backup.Lease{}
	a, ok, err := s.AcquireLease(ctx, "s", "a", t0, time.Minute, none)
	if err != nil || !ok || a.Generation != 1 {
		t.Fatalf("first take = %+v %v %v; want generation 1", a, ok, err)
	}
	a, _, _ = s.AcquireLease(ctx, "s", "a", t0.Add(time.Second), time.Minute, none)
	if a.Generation != 1 {
		t.Fatalf("renewal moved the generation to %d", a.Generation)
	}
	b, ok, err := s.AcquireLease(ctx, "s", "b", t0.Add(2*time.Second), time.Minute, a)
	if err != nil || !ok || b.Generation != 2 {
		t.Fatalf("takeover = %+v %v %v; want generation 2", b, ok, err)
	}
	p := point("s", 2, 1, backup.PointBase, 1, []backup.NewPiece{piece(1)}, 1)
	p.LeaseHolder, p.LeaseNow = "b", t0.Add(3*time.Second)
	if _, err := s.InsertPoint(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ReleaseLease(ctx, "s", "b"); err != nil {
		t.Fatal(err)
	}
	// The row is gone; the points remember generation 2.
	c, ok, err := s.AcquireLease(ctx, "s", "b", t0.Add(4*time.Second), time.Minute, none)
	if err != nil || !ok || c.Generation != 3 {
		t.Fatalf("take after release = %+v %v %v; want generation 3", c, ok, err)
	}
	if o, ok, err := s.AcquireLease(ctx, "other", "a", t0, time.Minute, none); err != nil || !ok || o.Generation != 1 {
		t.Fatalf("another session's generation = %+v %v %v; want its own 1", o, ok, err)
	}
}

func testPointInsertListRead(t *testing.T, s backup.Store) {
	ctx := context.Background()
	base := point("s", 1, 1, backup.PointBase, 1, []backup.NewPiece{piece(1), piece(2)}, 1, 2)
	id1, err := s.InsertPoint(ctx, base, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The delta brings piece 3, references the held piece 2, and brings
	// piece 1 again (a capture that did not know it was held): kept once.
	delta := point("s", 1, 2, backup.PointDelta, 2, []backup.NewPiece{piece(3), piece(1)}, 2, 3, 1)
	id2, err := s.InsertPoint(ctx, delta, nil)
	if err != nil || id2 <= id1 {
		t.Fatalf("second insert = %d, %v (first %d)", id2, err, id1)
	}
	list, err := s.ListPoints(ctx, "s", 10)
	if err != nil || len(list) != 2 || list[0].ID != id2 || list[1].ID != id1 {
		t.Fatalf("list = %+v, %v; want newest first", list, err)
	}
	got, want := list[0], delta.PointInfo
	want.ID = id2
	if got.SessionID != want.SessionID || got.Generation != want.Generation || got.Seq != want.Seq || got.Kind != want.Kind ||
		got.ManifestID != want.ManifestID || got.Parent != want.Parent || !got.CreatedAt.Equal(want.CreatedAt) ||
		got.Reason != want.Reason || got.DBSHA256 != want.DBSHA256 || got.SizeBytes != want.SizeBytes || got.StoredBytes != want.StoredBytes {
		t.Fatalf("row = %+v; want %+v", got, want)
	}
	if list[1].Parent != "" || list[1].Kind != backup.PointBase {
		t.Fatalf("base row = %+v", list[1])
	}
	ms, err := s.Manifests(ctx, "s")
	if err != nil || len(ms) != 2 || ms[0].ID != id1 || !bytes.Equal(ms[0].Sealed, base.Manifest) || !bytes.Equal(ms[1].Sealed, delta.Manifest) {
		t.Fatalf("manifests = %d, %v; want oldest first", len(ms), err)
	}
	for n := 1; n <= 3; n++ {
		if ok, err := s.HasPiece(ctx, "s", pieceID(n)); !ok || err != nil {
			t.Fatalf("has piece %d = %v %v", n, ok, err)
		}
		b, err := s.Piece(ctx, "s", pieceID(n))
		if err != nil || !bytes.Equal(b, piece(n).Data) {
			t.Fatalf("piece %d = %d bytes, %v", n, len(b), err)
		}
	}
	if ok, err := s.HasPiece(ctx, "other", pieceID(1)); ok || err != nil {
		t.Fatalf("another session sees the piece: %v %v", ok, err)
	}
	if _, err := s.Piece(ctx, "s", pieceID(9)); !errors.Is(err, backup.ErrNotFound) {
		t.Fatalf("missing piece err = %v; want ErrNotFound", err)
	}
	st, err := s.PointStats(ctx, "s")
	wantBytes := int64(len(piece(1).Data) + len(piece(2).Data) + len(piece(3).Data))
	if err != nil || st.Points != 2 || st.Bases != 1 || st.Pieces != 3 || st.PieceBytes != wantBytes ||
		st.ManifestBytes != int64(len(base.Manifest)+len(delta.Manifest)) {
		t.Fatalf("stats = %+v, %v; want 2 points, 1 base, 3 pieces of %d bytes", st, err, wantBytes)
	}
	// The same manifest twice is one point.
	if _, err := s.InsertPoint(ctx, delta, nil); err == nil {
		t.Fatal("the same manifest was stored twice")
	}
}

func testPointRollsBack(t *testing.T, s backup.Store) {
	ctx := context.Background()
	boom := errors.New("boom")
	p := point("s", 1, 1, backup.PointBase, 1, []backup.NewPiece{piece(1)}, 1)
	if _, err := s.InsertPoint(ctx, p, func(context.Context, backup.Tx) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("err = %v; want the hook's", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	_, err := s.InsertPoint(cctx, p, func(ctx context.Context, _ backup.Tx) error {
		cancel() // killed mid-insert
		<-ctx.Done()
		return ctx.Err()
	})
	if err == nil {
		t.Fatal("cancelled insert succeeded")
	}
	st, err := s.PointStats(ctx, "s")
	if err != nil || st.Points != 0 || st.Pieces != 0 {
		t.Fatalf("a rolled-back point left %+v (%v)", st, err)
	}
}

func testPointMissingPiece(t *testing.T, s backup.Store) {
	ctx := context.Background()
	p := point("s", 1, 1, backup.PointBase, 1, []backup.NewPiece{piece(1)}, 1, 2)
	if _, err := s.InsertPoint(ctx, p, nil); !errors.Is(err, backup.ErrPieceMissing) {
		t.Fatalf("err = %v; want ErrPieceMissing", err)
	}
	if st, _ := s.PointStats(ctx, "s"); st.Points != 0 || st.Pieces != 0 {
		t.Fatalf("a refused point left %+v", st)
	}
}

// testPointFencedByGeneration: the holder's insert passes; after a
// takeover the old holder's late write is refused, and so is a write of an
// old generation by a holder that took the lease back since.
func testPointFencedByGeneration(t *testing.T, s backup.Store) {
	ctx := context.Background()
	a, _, err := s.AcquireLease(ctx, "s", "a", t0, time.Minute, backup.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	insert := func(holder string, gen int64, n int) error {
		p := point("s", gen, int64(n), backup.PointBase, n, []backup.NewPiece{piece(n)}, n)
		p.LeaseHolder, p.LeaseNow = holder, t0.Add(time.Second)
		called := false
		_, err := s.InsertPoint(ctx, p, func(context.Context, backup.Tx) error { called = true; return nil })
		if err != nil && called {
			t.Fatalf("the transaction's work ran for a refused point")
		}
		return err
	}
	if err := insert("a", a.Generation, 1); err != nil {
		t.Fatalf("holder's insert: %v", err)
	}
	if err := insert("a", a.Generation+1, 2); !errors.Is(err, backup.ErrLeaseLost) {
		t.Fatalf("insert under a generation not (yet) held = %v; want ErrLeaseLost", err)
	}
	b, ok, err := s.AcquireLease(ctx, "s", "b", t0, time.Minute, a)
	if err != nil || !ok {
		t.Fatalf("takeover: %v %v", ok, err)
	}
	if err := insert("a", a.Generation, 3); !errors.Is(err, backup.ErrLeaseLost) {
		t.Fatalf("loser's late write = %v; want ErrLeaseLost", err)
	}
	a2, ok, err := s.AcquireLease(ctx, "s", "a", t0, time.Minute, b)
	if err != nil || !ok || a2.Generation <= b.Generation {
		t.Fatalf("take back = %+v %v %v", a2, ok, err)
	}
	if err := insert("a", a.Generation, 4); !errors.Is(err, backup.ErrLeaseLost) {
		t.Fatalf("a write of the holder's old generation = %v; want ErrLeaseLost", err)
	}
	if err := insert("a", a2.Generation, 5); err != nil {
		t.Fatalf("write of the current generation: %v", err)
	}
	list, _ := s.ListPoints(ctx, "s", 10)
	var gens []int64
	for _, p := range list {
		gens = append(gens, p.Generation)
	}
	if !slices.Equal(gens, []int64{a2.Generation, a.Generation}) {
		t.Fatalf("stored generations %v; want %d and %d only", gens, a2.Generation, a.Generation)
	}
}

// testDeletePointsCollectsPieces: deleting points removes exactly the
// pieces no remaining point of the session references.
func testDeletePointsCollectsPieces(t *testing.T, s backup.Store) {
	ctx := context.Background()
	id1, err := s.InsertPoint(ctx, point("s", 1, 1, backup.PointBase, 1, []backup.NewPiece{piece(1), piece(2)}, 1, 2), nil)
	if err != nil {
		t.Fatal(err)
	}
	id2, err := s.InsertPoint(ctx, point("s", 1, 2, backup.PointDelta, 2, []backup.NewPiece{piece(3)}, 3), nil)
	if err != nil {
		t.Fatal(err)
	}
	// A new base shares piece 2 with the old one.
	id3, err := s.InsertPoint(ctx, point("s", 1, 3, backup.PointBase, 3, []backup.NewPiece{piece(4)}, 2, 4), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Another session holds a piece of the same id: never touched.
	if _, err := s.InsertPoint(ctx, point("o", 1, 1, backup.PointBase, 1, []backup.NewPiece{piece(1)}, 1), nil); err != nil {
		t.Fatal(err)
	}
	points, pieces, err := s.DeletePoints(ctx, "s", []int64{id1, id2})
	if err != nil || points != 2 || pieces != 2 {
		t.Fatalf("delete = %d points, %d pieces, %v; want 2 and 2 (pieces 1 and 3)", points, pieces, err)
	}
	for n, want := range map[int]bool{1: false, 2: true, 3: false, 4: true} {
		if ok, err := s.HasPiece(ctx, "s", pieceID(n)); ok != want || err != nil {
			t.Fatalf("piece %d held = %v (%v); want %v", n, ok, err, want)
		}
	}
	if ok, _ := s.HasPiece(ctx, "o", pieceID(1)); !ok {
		t.Fatal("collection of s deleted a piece of o")
	}
	if list, _ := s.ListPoints(ctx, "s", 10); len(list) != 1 || list[0].ID != id3 {
		t.Fatalf("left %+v; want the new base only", list)
	}
	// Deleting another session's point id through s does nothing.
	if n, _, err := s.DeletePoints(ctx, "o", []int64{id3}); n != 0 || err != nil {
		t.Fatalf("delete through the wrong session = %d, %v", n, err)
	}
}
