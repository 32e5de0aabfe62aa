package incr

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// ErrNoPoint means no point verified: nothing was replaced.
var ErrNoPoint = errors.New("incr: no point verifies")

// RestoreOptions configure Restore. Pieces is required.
type RestoreOptions struct {
	Key    []byte
	Pieces PieceGetter
	// Check runs on the assembled file after integrity_check, before it replaces anything (the backup service
	// checks for a linked device). An error makes restore try the next older point.
	Check func(ctx context.Context, path string) error
	// Accept, when set, limits the points restore may pick (a chosen point,
	// or those at or before a time); their chains may use any point.
	Accept func(Manifest) bool
	Log    *slog.Logger
	Clock  clockwork.Clock
}

// Skipped is a point restore passed over, and why.
type Skipped struct {
	ID         Hash // zero when the manifest could not be read
	Generation int64
	Seq        uint64
	Reason     error
}

// Restored says which point was restored.
type Restored struct {
	Point   Manifest
	Age     time.Duration // how old the point was when restored
	Chain   int           // points assembled: the base and its deltas
	Skipped []Skipped     // newer points that did not verify, newest first, and manifests that could not be read
}

// Restore writes the newest point that verifies to path. sealed holds the sealed manifests of every stored point
// of the session, in any order and of any generations. A point verifies when its chain's manifests read, every
// piece it needs is present and intact, the assembled file's page hashes give the recorded DBHash, integrity_check
// answers ok and opts.Check passes. Points are tried in Newest order; a failure of one of those kinds moves to the
// next. A wrong or missing key, or an error of the piece store itself, stops restore at once: older points would
// fail alike, or a passing outage would turn into a stale restore. The file at path is replaced atomically only once
// a point has verified; on error it is untouched.
func Restore(ctx context.Context, path string, sealed [][]byte, opts RestoreOptions) (Restored, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Clock == nil {
		opts.Clock = clockwork.NewRealClock()
	}
	var res Restored
	var points []Manifest
	for _, s := range sealed {
		m, err := OpenManifest(s, opts.Key)
		if err != nil {
			if stopping(err) {
				return res, err
			}
			id, _ := PeekID(s)
			res.Skipped = append(res.Skipped, Skipped{ID: id, Reason: err})
			continue
		}
		points = append(points, m)
	}
	snapshot.RemoveStale(filepath.Dir(path), tempPattern(path))
	bad := make(map[Hash]error) // pieces found missing or corrupt
	for _, target := range Newest(points) {
		if opts.Accept != nil && !opts.Accept(target) {
			continue
		}
		chain, err := Chain(points, target.ID)
		if err == nil {
			err = assembleInto(ctx, path, chain, bad, opts)
		}
		if err == nil {
			res.Point, res.Chain = target, len(chain)
			res.Age = opts.Clock.Since(target.Created)
			logRestored(opts.Log, res)
			return res, nil
		}
		if stopping(err) || ctx.Err() != nil {
			return res, err
		}
		res.Skipped = append(res.Skipped, Skipped{ID: target.ID, Generation: target.Generation, Seq: target.Seq, Reason: err})
	}
	return res, fmt.Errorf("%w (%d points tried)", ErrNoPoint, len(res.Skipped))
}

// stopping tells errors that make restore stop from those that make it try an older point.
func stopping(err error) bool {
	if errors.Is(err, ErrWrongKey) || errors.Is(err, ErrNeedKey) || errors.Is(err, ErrPlaintext) || errors.Is(err, snapshot.ErrBadKey) {
		return true
	}
	var v verifyError
	return !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNoPiece) && !errors.Is(err, ErrBrokenChain) && !errors.As(err, &v)
}

// verifyError is a verification failure of an assembled file: integrity_check or the caller's check.
type verifyError struct{ err error }

func (e verifyError) Error() string { return "verify: " + e.err.Error() }
func (e verifyError) Unwrap() error { return e.err }

func logRestored(log *slog.Logger, res Restored) {
	m := res.Point
	if len(res.Skipped) == 0 {
		log.Info("incremental restore", "point", m.ID.String()[:12], "kind", m.Kind.String(), "generation", m.Generation,
			"seq", m.Seq, "age", res.Age.Round(time.Millisecond), "chain", res.Chain)
		return
	}
	first := res.Skipped[0]
	log.Warn("incremental restore fell back to an older point", "point", m.ID.String()[:12], "kind", m.Kind.String(),
		"generation", m.Generation, "seq", m.Seq, "age", res.Age.Round(time.Millisecond), "chain", res.Chain,
		"skipped", len(res.Skipped), "newest_skipped", first.ID.String()[:12], "reason", first.Reason.Error())
}

func tempPattern(path string) string { return "." + filepath.Base(path) + ".incr-*" }

// assembleInto builds chain's newest point in a temp file next to path, verifies it and renames it into place.
func assembleInto(ctx context.Context, path string, chain []Manifest, bad map[Hash]error, opts RestoreOptions) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), tempPattern(path))
	if err != nil {
		return fmt.Errorf("incr: restore temp file: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			snapshot.RemoveDB(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		_ = f.Close()
		return fmt.Errorf("incr: restore temp file: %w", err)
	}
	werr := assemble(ctx, f, chain, bad, opts.Pieces, opts.Key)
	serr := f.Sync()
	cerr := f.Close()
	if werr != nil {
		return werr
	}
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("incr: write restored store: %w", err)
	}
	if err := snapshot.Check(ctx, tmp); err != nil {
		return verifyError{err}
	}
	if opts.Check != nil {
		if err := opts.Check(ctx, tmp); err != nil {
			return verifyError{err}
		}
	}
	// The checks may have left -wal/-shm files next to the temp file: they describe it, not the target.
	for _, side := range []string{"-wal", "-shm"} {
		_ = os.Remove(tmp + side)
	}
	if err := snapshot.InstallDB(tmp, path); err != nil {
		return fmt.Errorf("incr: install restored store: %w", err)
	}
	return nil
}

// writerAt is where Assemble writes the database.
type writerAt interface {
	WriteAt(b []byte, off int64) (int, error)
	Truncate(size int64) error
}

// assemble writes the newest point of chain (base first) into w: for each page, the newest version the chain holds,
// checked against the page hash its manifest recorded. Only the pieces that still supply a page are fetched, so a
// page rewritten by every delta costs one read. Pieces in bad are known missing or corrupt; pieces found so are
// added to it. The manifests' page hashes must give the newest point's DBHash.
func assemble(ctx context.Context, w writerAt, chain []Manifest, bad map[Hash]error, pieces PieceGetter, key []byte) error {
	target := chain[len(chain)-1]
	n, size := target.PageCount, target.PageSize
	type source struct {
		piece Hash
		hash  Hash
		set   bool
	}
	src := make([]source, n+1)
	minCount := n
	for i := len(chain) - 1; i >= 0; i-- {
		m := chain[i]
		minCount = min(minCount, m.PageCount)
		for _, p := range m.Pages {
			if int(p.Pgno) <= minCount && !src[p.Pgno].set {
				src[p.Pgno] = source{piece: m.Pieces[p.Piece].ID, hash: p.Hash, set: true}
			}
		}
	}
	hashes := make([]Hash, n)
	need := make(map[Hash]int) // piece -> pages it supplies
	var order []Hash
	for pgno := 1; pgno <= n; pgno++ {
		s := src[pgno]
		if !s.set {
			return fmt.Errorf("%w: no point of the chain holds page %d", ErrCorrupt, pgno)
		}
		hashes[pgno-1] = s.hash
		if need[s.piece] == 0 {
			order = append(order, s.piece)
		}
		need[s.piece]++
	}
	if DBHash(size, hashes) != target.DBHash {
		return fmt.Errorf("%w: the chain's page hashes do not give point %s's database hash", ErrCorrupt, target.ID)
	}
	for _, id := range order {
		if err := bad[id]; err != nil {
			return err
		}
	}
	if err := w.Truncate(int64(n) * int64(size)); err != nil {
		return fmt.Errorf("incr: size restored store: %w", err)
	}
	for _, id := range order {
		if err := ctx.Err(); err != nil {
			return err
		}
		sealed, err := pieces.Get(ctx, id)
		if err != nil {
			if errors.Is(err, ErrNoPiece) {
				bad[id] = err
			}
			return err
		}
		ps, pages, err := openPiece(id, sealed, key)
		if err != nil {
			if errors.Is(err, ErrCorrupt) {
				bad[id] = err
			}
			return err
		}
		if ps != size {
			err := fmt.Errorf("%w: piece %s has %d-byte pages, the point %d", ErrCorrupt, id, ps, size)
			bad[id] = err
			return err
		}
		written := 0
		for _, p := range pages {
			if int(p.pgno) > n || src[p.pgno].piece != id {
				continue // superseded by a newer point, or beyond the end
			}
			if sha256.Sum256(p.data) != src[p.pgno].hash {
				err := fmt.Errorf("%w: page %d of piece %s does not match its manifest", ErrCorrupt, p.pgno, id)
				bad[id] = err
				return err
			}
			if _, err := w.WriteAt(p.data, int64(p.pgno-1)*int64(size)); err != nil {
				return fmt.Errorf("incr: write restored store: %w", err)
			}
			written++
		}
		if written != need[id] {
			err := fmt.Errorf("%w: piece %s lacks pages its manifest lists", ErrCorrupt, id)
			bad[id] = err
			return err
		}
	}
	return nil
}
