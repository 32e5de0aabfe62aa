package incr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// ErrNoPiece is what a PieceStore's Get returns for an id it does not hold.
var ErrNoPiece = errors.New("incr: piece not found")

// PieceStore keeps sealed pieces by id. The backup service implements it on its catalog (PostgreSQL or SQLite);
// MemStore and DirStore serve tests and the local fallback. Put of an id already held must succeed and may keep
// either copy: both decode to the same plaintext.
type PieceStore interface {
	PieceChecker
	PiecePutter
	PieceGetter
}

// PieceChecker is the part of a PieceStore capture needs: pieces already stored are not sealed again.
type PieceChecker interface {
	Has(ctx context.Context, id Hash) (bool, error)
}

// PiecePutter is the part of a PieceStore Point.Store needs.
type PiecePutter interface {
	Put(ctx context.Context, id Hash, sealed []byte) error
}

// PieceGetter is the part of a PieceStore restore needs.
type PieceGetter interface {
	Get(ctx context.Context, id Hash) ([]byte, error)
}

var (
	_ PieceStore = (*MemStore)(nil)
	_ PieceStore = (*DirStore)(nil)
)

// MemStore is a PieceStore in memory.
type MemStore struct {
	mu     sync.Mutex
	pieces map[Hash][]byte
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore { return &MemStore{pieces: make(map[Hash][]byte)} }

// Has reports whether id is held.
func (s *MemStore) Has(_ context.Context, id Hash) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.pieces[id]
	return ok, nil
}

// Put stores a copy of sealed under id.
func (s *MemStore) Put(_ context.Context, id Hash, sealed []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pieces[id] = append([]byte(nil), sealed...)
	return nil
}

// Get returns a copy of the piece, or ErrNoPiece.
func (s *MemStore) Get(_ context.Context, id Hash) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.pieces[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoPiece, id)
	}
	return append([]byte(nil), b...), nil
}

// Delete removes id (garbage collection).
func (s *MemStore) Delete(_ context.Context, id Hash) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pieces, id)
	return nil
}

// IDs lists the ids held, in no order.
func (s *MemStore) IDs() []Hash {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Hash, 0, len(s.pieces))
	for id := range s.pieces {
		out = append(out, id)
	}
	return out
}

// Replace overwrites a piece's bytes (tests: corrupt a piece in place).
func (s *MemStore) Replace(id Hash, sealed []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pieces[id] = append([]byte(nil), sealed...)
}

// DirStore is a PieceStore in a directory, one file per piece named by its id: the local fallback's layout. Each
// Put is an atomic file write, so a crash leaves a piece whole or absent.
type DirStore struct {
	dir string
}

// NewDirStore uses dir, creating it (owner only) if needed.
func NewDirStore(dir string) (*DirStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("incr: piece directory: %w", err)
	}
	return &DirStore{dir: dir}, nil
}

func (s *DirStore) path(id Hash) string { return filepath.Join(s.dir, id.String()+".piece") }

// Has reports whether id is held.
func (s *DirStore) Has(_ context.Context, id Hash) (bool, error) {
	_, err := os.Stat(s.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("incr: piece %s: %w", id, err)
	}
	return true, nil
}

// Put writes the piece through a temp file, fsync and rename.
func (s *DirStore) Put(_ context.Context, id Hash, sealed []byte) error {
	f, err := os.CreateTemp(s.dir, ".piece-*")
	if err != nil {
		return fmt.Errorf("incr: put piece %s: %w", id, err)
	}
	_, werr := f.Write(sealed)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("incr: put piece %s: %w", id, err)
	}
	if err := snapshot.RenameDurable(f.Name(), s.path(id)); err != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("incr: put piece %s: %w", id, err)
	}
	return nil
}

// Get reads the piece, or returns ErrNoPiece.
func (s *DirStore) Get(_ context.Context, id Hash) ([]byte, error) {
	b, err := os.ReadFile(s.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNoPiece, id)
	}
	if err != nil {
		return nil, fmt.Errorf("incr: get piece %s: %w", id, err)
	}
	return b, nil
}

// Delete removes id (garbage collection); a missing piece is not an error.
func (s *DirStore) Delete(_ context.Context, id Hash) error {
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("incr: delete piece %s: %w", id, err)
	}
	return nil
}
