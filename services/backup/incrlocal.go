package backup

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/blacksky-md/blacksky/services/backup/incr"
	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// LocalPoints is the incremental local fallback, $DATA_DIR/backups/incr:
// points in the catalog's format (bincr/1) taken while the database does
// not answer, pieces in a DirStore (pieces/<id>.piece) and sealed manifests
// as points/<generation>-<seq>-<id>.bincr, each written atomically (pieces
// first, so a manifest is never there without its pieces). The first point
// after the database failed is a base, so the local chain stands alone;
// once the database answers again a fresh base goes there and this
// directory is emptied (see Incremental.Ship).
type LocalPoints struct {
	Dir string
}

func (l LocalPoints) pointDir() string { return filepath.Join(l.Dir, "points") }
func (l LocalPoints) pieceDir() string { return filepath.Join(l.Dir, "pieces") }

// Pieces is the fallback's piece store.
func (l LocalPoints) Pieces() (*incr.DirStore, error) { return incr.NewDirStore(l.pieceDir()) }

// Put stores pt: its new pieces, then its manifest.
func (l LocalPoints) Put(ctx context.Context, pt *incr.Point) error {
	ps, err := l.Pieces()
	if err != nil {
		return fmt.Errorf("local fallback: %w", err)
	}
	if err := pt.Store(ctx, ps); err != nil {
		return fmt.Errorf("local fallback: %w", err)
	}
	if err := os.MkdirAll(l.pointDir(), 0o700); err != nil {
		return fmt.Errorf("local fallback: %w", err)
	}
	m := pt.Manifest
	name := fmt.Sprintf("%020d-%020d-%s.bincr", m.Generation, m.Seq, m.ID)
	if err := snapshot.WriteFileAtomic(filepath.Join(l.pointDir(), name), pt.Sealed, 0o600); err != nil {
		return fmt.Errorf("local fallback: %w", err)
	}
	return nil
}

// LocalPoint is one manifest file of the fallback.
type LocalPoint struct {
	Path       string
	Generation int64
	Seq        uint64
	ID         string
}

// List returns the fallback's points, newest (highest generation, then
// sequence) first; names we did not write are ignored.
func (l LocalPoints) List() ([]LocalPoint, error) {
	entries, err := os.ReadDir(l.pointDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local fallback: %w", err)
	}
	var out []LocalPoint
	for _, e := range entries {
		var p LocalPoint
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".bincr") {
			continue
		}
		if _, err := fmt.Sscanf(strings.TrimSuffix(name, ".bincr"), "%d-%d-%s", &p.Generation, &p.Seq, &p.ID); err != nil {
			continue
		}
		p.Path = filepath.Join(l.pointDir(), name)
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b LocalPoint) int {
		return cmp.Or(cmp.Compare(b.Generation, a.Generation), cmp.Compare(b.Seq, a.Seq))
	})
	return out, nil
}

// Manifests reads every sealed manifest of the fallback (unreadable files
// are skipped: restore passes over what it cannot verify anyway).
func (l LocalPoints) Manifests() ([][]byte, error) {
	list, err := l.List()
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for _, p := range list {
		if b, err := os.ReadFile(p.Path); err == nil {
			out = append(out, b)
		}
	}
	return out, nil
}

// Keep deletes the manifests not in keep, then every piece no kept
// manifest references: the fallback holds one chain at a time.
func (l LocalPoints) Keep(keep []incr.Manifest) error {
	ids := map[string]bool{}
	for _, m := range keep {
		ids[m.ID.String()] = true
	}
	list, err := l.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range list {
		if !ids[p.ID] {
			if err := os.Remove(p.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	held, err := l.pieceIDs()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	ps, err := l.Pieces()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, id := range incr.Unreferenced(held, keep) {
		errs = append(errs, ps.Delete(context.Background(), id))
	}
	return errors.Join(errs...)
}

// Clear empties the fallback: its points are in the database now, or
// another instance's store replaced ours.
func (l LocalPoints) Clear() error { return l.Keep(nil) }

func (l LocalPoints) pieceIDs() ([]incr.Hash, error) {
	entries, err := os.ReadDir(l.pieceDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local fallback: %w", err)
	}
	var out []incr.Hash
	for _, e := range entries {
		if id, err := incr.ParseHash(strings.TrimSuffix(e.Name(), ".piece")); err == nil && strings.HasSuffix(e.Name(), ".piece") {
			out = append(out, id)
		}
	}
	return out, nil
}
