package backup

import (
	"context"
	"errors"
	"time"
)

// Incremental points in the catalog (issue 10): a point row holds the
// sealed bincr/1 manifest of one point of the session store (package incr),
// the pieces it references are stored once per session and id, and the
// catalog keeps which point references which piece, so retention deletes
// the points it no longer needs and then every piece no remaining point
// references, in one transaction.

// Point kinds, as recorded.
const (
	PointBase  = "base"
	PointDelta = "delta"
)

// PointInfo is one stored point's metadata (the manifest is read apart).
type PointInfo struct {
	ID          int64 // catalog id: insert order
	SessionID   string
	Generation  int64
	Seq         int64
	Kind        string // PointBase or PointDelta
	ManifestID  string // hex sha256 of the manifest's encoding (incr.Manifest.ID)
	Parent      string // the parent's ManifestID; empty for a base
	CreatedAt   time.Time
	Reason      string
	DBSHA256    string // hex incr.DBHash of the assembled database
	SizeBytes   int64  // the database's size (page size times page count)
	StoredBytes int64  // what the point added: its manifest and the pieces that were new
}

// NewPiece is a sealed piece to store.
type NewPiece struct {
	ID   string // hex sha256 of its plaintext
	Data []byte
}

// NewPoint is a point to insert with the pieces it adds.
type NewPoint struct {
	PointInfo
	Manifest []byte     // sealed
	Pieces   []NewPiece // the pieces the catalog may not hold yet; ones it holds are kept
	// Refs names every piece the manifest references (new or held): the
	// insert fails unless the session holds each of them once it is done.
	Refs []string
	// LeaseHolder, when set, makes the insert conditional: the lease row of
	// SessionID must be LeaseHolder's, unexpired at LeaseNow and still of
	// the point's Generation, checked in the same transaction; otherwise
	// nothing is stored and the error is ErrLeaseLost.
	LeaseHolder string
	LeaseNow    time.Time
}

// PointStats sums a session's points and what they occupy.
type PointStats struct {
	Points        int64
	Bases         int64
	ManifestBytes int64
	Pieces        int64
	PieceBytes    int64
}

// StoredBytes is everything the points occupy: manifests and pieces.
func (s PointStats) StoredBytes() int64 { return s.ManifestBytes + s.PieceBytes }

// SealedManifest is a stored point's sealed manifest with its catalog id.
type SealedManifest struct {
	ID     int64
	Sealed []byte
}

// ErrPieceMissing is a point insert refused because a piece its manifest
// references is not stored (and not among the pieces it brought).
var ErrPieceMissing = errors.New("not stored: a piece the point references is missing")

// Points keeps the incremental points of sessions.
type Points interface {
	// InsertPoint stores p's new pieces, the point and its references, and
	// runs inTx (when not nil), all in one transaction: nothing is stored
	// unless everything succeeds.
	InsertPoint(ctx context.Context, p NewPoint, inTx InTx) (int64, error)
	// ListPoints returns up to limit points of session, newest first.
	ListPoints(ctx context.Context, session string, limit int) ([]PointInfo, error)
	// Manifests returns every sealed manifest of session, oldest first.
	Manifests(ctx context.Context, session string) ([]SealedManifest, error)
	// HasPiece tells whether session holds piece id.
	HasPiece(ctx context.Context, session, id string) (bool, error)
	// Piece returns a piece's sealed bytes, or ErrNotFound.
	Piece(ctx context.Context, session, id string) ([]byte, error)
	// DeletePoints deletes the given points of session and then every
	// piece of session no remaining point references, in one transaction.
	DeletePoints(ctx context.Context, session string, ids []int64) (points, pieces int64, err error)
	// PointStats sums session's points and their storage.
	PointStats(ctx context.Context, session string) (PointStats, error)
}
