package incr

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
)

// basePiecePages is a base's piece: 64 pages aligned on page numbers, so the regions of the file that did not
// change between two bases give identical pieces, which are stored once.
const basePiecePages = 64

// Base captures every page of the store as a base point of generation gen with sequence number seq.
func (c *Capturer) Base(ctx context.Context, gen int64, seq uint64) (*Point, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sc, err := c.pin(ctx, walPos{}, nil, false)
	if err != nil {
		return nil, err
	}
	st := &state{pos: sc.end}
	b := &builder{c: c, ctx: ctx, pt: &Point{FullRead: true, Manifest: Manifest{Kind: KindBase, Generation: gen, Seq: seq}}}
	err = c.readAll(ctx, func(pageSize, pageCount int, pgno uint32, data []byte) error {
		if st.hashes == nil {
			st.pageSize, b.pageSize = pageSize, pageSize
			st.hashes = make([]Hash, 0, pageCount)
		}
		if (pgno-1)%basePiecePages == 0 {
			if err := b.flush(); err != nil {
				return err
			}
		}
		h := Hash(sha256.Sum256(data))
		st.hashes = append(st.hashes, h)
		b.add(pgno, slices.Clone(data), h)
		return nil
	})
	if err != nil {
		return nil, err
	}
	pt, err := b.finish(st)
	if err != nil {
		return nil, err
	}
	c.prev, c.last = c.last, st
	if c.prev != nil && c.prev.m.ID == st.m.ID {
		c.prev = nil
	}
	return pt, nil
}

// Delta captures the pages that changed since the point since as a delta of generation gen (never lower than
// since's). since must be one of the last two points this Capturer returned (the newest may have been lost before
// it was recorded) or the point Resume rebuilt; otherwise ErrUnknownParent. ErrNoChange when nothing changed.
//
// Normally the changed pages come from the WAL frames committed since since, read without any lock; every
// CheckpointFrames the WAL is checkpointed under the write lock. After Open or Resume, or if the WAL was
// checkpointed away by someone else, every page is read and compared with since's hashes instead (FullRead).
func (c *Capturer) Delta(ctx context.Context, since Manifest, gen int64) (*Point, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen < since.Generation {
		return nil, fmt.Errorf("incr: delta of generation %d on a point of generation %d", gen, since.Generation)
	}
	var parent *state
	for _, s := range []*state{c.last, c.prev} {
		if s != nil && s.m.ID == since.ID {
			parent = s
			break
		}
	}
	if parent == nil {
		return nil, ErrUnknownParent
	}
	seq := uint64(1)
	if gen == since.Generation {
		seq = since.Seq + 1
	}
	b := &builder{c: c, ctx: ctx, pageSize: parent.pageSize,
		pt: &Point{Manifest: Manifest{Kind: KindDelta, Generation: gen, Seq: seq, Parent: since.ID}}}
	st := &state{pageSize: parent.pageSize}

	changed, err := c.walDelta(ctx, parent, st)
	if errors.Is(err, errWALLost) {
		if parent.pos.known {
			c.opts.Log.Info("incremental backup: WAL checkpointed outside the replicator; comparing every page once")
		}
		changed, err = c.fullDelta(ctx, parent, st, b.pt)
	}
	if err != nil {
		return nil, err
	}
	if len(changed) == 0 && len(st.hashes) == len(parent.hashes) {
		parent.pos = st.pos // the WAL moved on without changing a page
		return nil, ErrNoChange
	}
	for i, p := range changed {
		if i > 0 && i%MaxPiecePages == 0 {
			if err := b.flush(); err != nil {
				return nil, err
			}
		}
		b.add(p.pgno, p.data, st.hashes[p.pgno-1])
	}
	pt, err := b.finish(st)
	if err != nil {
		return nil, err
	}
	if parent == c.last {
		c.prev = c.last
	}
	c.last = st
	return pt, nil
}

// walDelta finds the changed pages from the WAL frames committed after parent's position. It fills st's hashes and
// position. errWALLost sends the caller to fullDelta.
func (c *Capturer) walDelta(ctx context.Context, parent, st *state) ([]page, error) {
	if !parent.pos.known {
		return nil, errWALLost
	}
	var changed []page
	read := func(sc walScan) error {
		changed = changed[:0]
		if sc.dbPages == 0 { // no commit since
			st.hashes = slices.Clone(parent.hashes)
			return nil
		}
		if sc.pageSize != parent.pageSize {
			return errWALLost
		}
		st.hashes = make([]Hash, sc.dbPages)
		copy(st.hashes, parent.hashes)
		f, err := os.Open(c.wal)
		if err != nil {
			return fmt.Errorf("incr: open wal: %w", err)
		}
		defer f.Close()
		for pgno := uint32(len(parent.hashes) + 1); int(pgno) <= sc.dbPages; pgno++ {
			if _, ok := sc.frames[pgno]; !ok {
				return errWALLost // the store grew by a page no frame wrote: do not guess
			}
		}
		pgnos := make([]uint32, 0, len(sc.frames))
		for pgno := range sc.frames {
			if int(pgno) <= sc.dbPages {
				pgnos = append(pgnos, pgno)
			}
		}
		slices.Sort(pgnos)
		for _, pgno := range pgnos {
			data := make([]byte, sc.pageSize)
			if err := readFrame(f, sc.pageSize, sc.frames[pgno], data); err != nil {
				return err
			}
			h := Hash(sha256.Sum256(data))
			if int(pgno) <= len(parent.hashes) && parent.hashes[pgno-1] == h {
				continue
			}
			st.hashes[pgno-1] = h
			changed = append(changed, page{pgno: pgno, data: data})
		}
		return nil
	}
	size := int64(0)
	if fi, err := os.Stat(c.wal); err == nil {
		size = fi.Size()
	}
	frames := (size - walHeaderSize) / int64(walFrameHeaderSize+parent.pageSize)
	var sc walScan
	var err error
	if frames > c.opts.CheckpointFrames {
		// Read under the write lock, checkpoint, and only then let the next writer restart the WAL.
		sc, err = c.pin(ctx, parent.pos, read, true)
	} else {
		// Frames up to the last valid commit are never rewritten while the guard is open: no lock needed.
		sc, err = scanWAL(c.wal, parent.pos)
		if err == nil {
			err = read(sc)
		}
	}
	if err != nil {
		return nil, err
	}
	st.pos = sc.end
	return changed, nil
}

// fullDelta reads every page at a pinned snapshot and compares it with parent's hashes.
func (c *Capturer) fullDelta(ctx context.Context, parent, st *state, pt *Point) ([]page, error) {
	pt.FullRead = true
	sc, err := c.pin(ctx, walPos{}, nil, false)
	if err != nil {
		return nil, err
	}
	st.pos = sc.end
	st.hashes = nil
	var changed []page
	err = c.readAll(ctx, func(pageSize, pageCount int, pgno uint32, data []byte) error {
		if pageSize != parent.pageSize {
			return fmt.Errorf("incr: page size changed from %d to %d: take a base", parent.pageSize, pageSize)
		}
		if st.hashes == nil {
			st.hashes = make([]Hash, 0, pageCount)
		}
		h := Hash(sha256.Sum256(data))
		st.hashes = append(st.hashes, h)
		if int(pgno) > len(parent.hashes) || parent.hashes[pgno-1] != h {
			changed = append(changed, page{pgno: pgno, data: slices.Clone(data)})
		}
		return nil
	})
	return changed, err
}

// Resume rebuilds the page hashes of the newest point of chain (a base and its deltas in order, as Chain returns
// them) from the manifests alone, so that after a restart the next Delta on that point is small. That first delta
// reads every page to compare (the WAL position is not persisted). Resume checks the chain's links and that the
// rebuilt hashes give the newest point's DBHash.
func (c *Capturer) Resume(chain []Manifest) error {
	hashes, err := chainHashes(chain)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	last := chain[len(chain)-1]
	c.prev, c.last = nil, &state{m: last, pageSize: last.PageSize, hashes: hashes}
	return nil
}

// chainHashes applies a chain's page hashes in order and checks the links and the final DBHash.
func chainHashes(chain []Manifest) ([]Hash, error) {
	if len(chain) == 0 || chain[0].Kind != KindBase {
		return nil, errors.New("incr: a chain starts with a base")
	}
	var hashes []Hash
	for i, m := range chain {
		if i > 0 && (m.Kind != KindDelta || m.Parent != chain[i-1].ID || m.PageSize != chain[0].PageSize) {
			return nil, fmt.Errorf("incr: point %s does not follow %s", m.ID, chain[i-1].ID)
		}
		if m.PageCount > len(hashes) {
			hashes = append(hashes, make([]Hash, m.PageCount-len(hashes))...)
		}
		hashes = hashes[:m.PageCount]
		for _, p := range m.Pages {
			hashes[p.Pgno-1] = p.Hash
		}
	}
	last := chain[len(chain)-1]
	if DBHash(last.PageSize, hashes) != last.DBHash {
		return nil, fmt.Errorf("%w: the chain's page hashes do not give point %s's database hash", ErrCorrupt, last.ID)
	}
	return hashes, nil
}
