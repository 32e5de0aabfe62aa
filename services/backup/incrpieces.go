package backup

import (
	"context"
	"errors"
	"fmt"

	"github.com/blacksky-md/blacksky/services/backup/incr"
)

// catalogPieces is a session's pieces in the catalog as incr sees a piece
// store: what capture asks (Has) and restore reads (Get). Pieces are put in
// the point's own transaction (Points.InsertPoint), never one by one.
type catalogPieces struct {
	cat     Points
	session string
}

var (
	_ incr.PieceChecker = catalogPieces{}
	_ incr.PieceGetter  = catalogPieces{}
)

func (c catalogPieces) Has(ctx context.Context, id incr.Hash) (bool, error) {
	return c.cat.HasPiece(ctx, c.session, id.String())
}

// Get returns the piece; a missing one is incr.ErrNoPiece (restore falls
// back), any other error a database failure (restore stops).
func (c catalogPieces) Get(ctx context.Context, id incr.Hash) ([]byte, error) {
	b, err := c.cat.Piece(ctx, c.session, id.String())
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", incr.ErrNoPiece, id)
	}
	if err != nil {
		return nil, &DBError{Err: err}
	}
	return b, nil
}

// layeredPieces reads a piece from the first store that holds it: the
// local fallback's, then the catalog's.
type layeredPieces []incr.PieceGetter

func (l layeredPieces) Get(ctx context.Context, id incr.Hash) ([]byte, error) {
	var err error
	for _, g := range l {
		var b []byte
		if b, err = g.Get(ctx, id); err == nil || !errors.Is(err, incr.ErrNoPiece) {
			return b, err
		}
	}
	if err == nil {
		err = fmt.Errorf("%w: %s", incr.ErrNoPiece, id)
	}
	return nil, err
}

// switchChecker answers capture's Has for wherever the point being taken
// goes: the catalog, or the local fallback. A piece held elsewhere counts as
// missing, so it is sealed again and the point stands in its own store.
type switchChecker struct{ to incr.PieceChecker }

func (s *switchChecker) Has(ctx context.Context, id incr.Hash) (bool, error) {
	if s.to == nil {
		return false, nil
	}
	return s.to.Has(ctx, id)
}

// newPoint is pt as the catalog stores it.
func newPoint(session, reason string, pt *incr.Point) NewPoint {
	m := pt.Manifest
	kind := PointDelta
	parent := m.Parent.String()
	if m.Kind == incr.KindBase {
		kind, parent = PointBase, ""
	}
	np := NewPoint{PointInfo: PointInfo{SessionID: session, Generation: m.Generation, Seq: int64(m.Seq), Kind: kind,
		ManifestID: m.ID.String(), Parent: parent, CreatedAt: m.Created.UTC(), Reason: reason, DBSHA256: m.DBHash.String(),
		SizeBytes: int64(m.PageSize) * int64(m.PageCount), StoredBytes: pt.StoredBytes()}, Manifest: pt.Sealed}
	for _, pc := range pt.Pieces {
		np.Pieces = append(np.Pieces, NewPiece{ID: pc.ID.String(), Data: pc.Data})
	}
	for _, r := range m.Pieces {
		np.Refs = append(np.Refs, r.ID.String())
	}
	return np
}
