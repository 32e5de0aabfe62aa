package incr

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// Format is the versioned name of this package's points, to be recorded next to each point as bsnap/1 is for full
// snapshots.
const Format = "bincr/1"

// Kind tells a base (every page) from a delta (the pages changed since its parent).
type Kind uint8

const (
	// KindBase is a full point: every page of the database.
	KindBase Kind = 1
	// KindDelta holds the pages that differ from its parent point.
	KindDelta Kind = 2
)

func (k Kind) String() string {
	switch k {
	case KindBase:
		return "base"
	case KindDelta:
		return "delta"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Hash is a sha256.
type Hash [32]byte

// String is the lower-case hex form, the form ids are stored in.
func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// ParseHash reads the hex form of a Hash.
func ParseHash(s string) (Hash, error) {
	var h Hash
	if len(s) != 2*len(h) {
		return h, fmt.Errorf("incr: id %q is not 64 hex digits", s)
	}
	if _, err := hex.Decode(h[:], []byte(s)); err != nil {
		return h, fmt.Errorf("incr: id %q: %w", s, err)
	}
	return h, nil
}

// Limits on declared sizes, checked before anything is allocated from them.
const (
	// MaxPiecePages bounds the pages in one piece (1 MB at SQLite's default 4 KiB pages).
	MaxPiecePages = 256
	// MaxDBSize is the largest database a point may describe: the same bound as a bsnap/1 payload.
	MaxDBSize   = snapshot.MaxPlainSize
	minPageSize = 512
	maxPageSize = 65536
	// maxPages is the most pages MaxDBSize can hold at the smallest page size.
	maxPages = MaxDBSize / minPageSize
)

var (
	// ErrCorrupt means a manifest or piece is damaged or not one of ours. Restore falls back to an older point.
	ErrCorrupt = snapshot.ErrCorrupt
	// ErrWrongKey means a manifest or piece was sealed under another key: restore stops rather than fall back,
	// since older points will fail the same way. It is bsnap/1's error, so callers test one value for both formats.
	ErrWrongKey = snapshot.ErrWrongKey
	// ErrNeedKey means a manifest or piece is encrypted and no key was given.
	ErrNeedKey = snapshot.ErrNeedKey
	// ErrPlaintext means a manifest or piece is not encrypted although a key is configured: refused, as bsnap/1
	// payloads are, so that nobody can slip an unencrypted store in under an encrypted deployment.
	ErrPlaintext = errors.New("incremental point is not encrypted although SESSION_ENCRYPTION_KEY is set")
)

// PieceRef is a manifest's reference to a piece: its id and how many of the point's pages it holds.
type PieceRef struct {
	ID    Hash
	Pages int
}

// PageRef says where a point's page comes from: its number, the index of its piece in Manifest.Pieces and the
// sha256 of its bytes.
type PageRef struct {
	Pgno  uint32
	Piece int
	Hash  Hash
}

// Manifest describes one point. ID is not encoded: it is the sha256 of the encoding, filled in by SealManifest and OpenManifest.
type Manifest struct {
	ID         Hash
	Kind       Kind
	Generation int64 // opaque to this package: the lease generation the point was written under
	Seq        uint64
	Created    time.Time
	Parent     Hash // zero for a base
	PageSize   int
	PageCount  int
	DBHash     Hash // see DBHash
	Pieces     []PieceRef
	Pages      []PageRef // sorted by Pgno; a base lists every page
}

// PlainBytes is the size of the pages the point carries (what compaction compares).
func (m *Manifest) PlainBytes() int64 { return int64(len(m.Pages)) * int64(m.PageSize) }

// DBHash is what a manifest records as "the sha256 of the assembled database": sha256 over the page size, the page
// count and each page's sha256 in page order. It binds every byte of the file as a flat sha256 would, and a delta
// can compute it from the hashes it keeps without reading the 99% of pages that did not change.
func DBHash(pageSize int, pages []Hash) Hash {
	h := sha256.New()
	var hdr [16]byte
	copy(hdr[:8], "bincrdb1")
	binary.BigEndian.PutUint32(hdr[8:], uint32(pageSize))
	binary.BigEndian.PutUint32(hdr[12:], uint32(len(pages)))
	h.Write(hdr[:])
	for i := range pages {
		h.Write(pages[i][:])
	}
	var out Hash
	h.Sum(out[:0])
	return out
}

// Manifest plaintext layout (big endian):
//
//	magic "BINCRMF1" | kind u8 | 3 zero bytes | generation i64 | seq u64 | created unix ns i64 | parent [32]
//	page size u32 | page count u32 | db hash [32] | npieces u32 | npieces × (id [32], pages u32)
//	npages u32 | npages × (pgno u32, piece index u32, page hash [32])
const (
	manifestMagic   = "BINCRMF1"
	manifestFixed   = 8 + 4 + 8 + 8 + 8 + 32 + 4 + 4 + 32 + 4
	pieceRefSize    = 32 + 4
	pageRefSize     = 4 + 4 + 32
	maxManifestSize = manifestFixed + 4 + maxPages*(pieceRefSize+pageRefSize)
)

func (m *Manifest) marshal() []byte {
	b := make([]byte, 0, manifestFixed+4+len(m.Pieces)*pieceRefSize+len(m.Pages)*pageRefSize)
	b = append(b, manifestMagic...)
	b = append(b, byte(m.Kind), 0, 0, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Generation))
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Created.UnixNano()))
	b = append(b, m.Parent[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(m.PageSize))
	b = binary.BigEndian.AppendUint32(b, uint32(m.PageCount))
	b = append(b, m.DBHash[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.Pieces)))
	for _, p := range m.Pieces {
		b = append(b, p.ID[:]...)
		b = binary.BigEndian.AppendUint32(b, uint32(p.Pages))
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.Pages)))
	for _, p := range m.Pages {
		b = binary.BigEndian.AppendUint32(b, p.Pgno)
		b = binary.BigEndian.AppendUint32(b, uint32(p.Piece))
		b = append(b, p.Hash[:]...)
	}
	return b
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// parseManifest is the strict decoder of a manifest's plaintext: every count is checked against the limits and
// the bytes left before anything is allocated, every cross-reference is checked, and trailing bytes are refused.
func parseManifest(b []byte) (Manifest, error) {
	var m Manifest
	if len(b) < manifestFixed {
		return m, corrupt("manifest is %d bytes, shorter than its fixed part", len(b))
	}
	if len(b) > maxManifestSize {
		return m, corrupt("manifest is %d bytes, over the limit", len(b))
	}
	if string(b[:8]) != manifestMagic {
		return m, corrupt("not a bincr/1 manifest (bad magic)")
	}
	m.Kind = Kind(b[8])
	if m.Kind != KindBase && m.Kind != KindDelta {
		return m, corrupt("unknown point kind %d", b[8])
	}
	if b[9]|b[10]|b[11] != 0 {
		return m, corrupt("reserved bytes set")
	}
	r := b[12:]
	u64 := func() uint64 { v := binary.BigEndian.Uint64(r); r = r[8:]; return v }
	u32 := func() uint32 { v := binary.BigEndian.Uint32(r); r = r[4:]; return v }
	hash := func() (h Hash) { copy(h[:], r); r = r[32:]; return h }
	m.Generation = int64(u64())
	m.Seq = u64()
	m.Created = time.Unix(0, int64(u64())).UTC()
	m.Parent = hash()
	m.PageSize = int(u32())
	m.PageCount = int(u32())
	m.DBHash = hash()
	if m.PageSize < minPageSize || m.PageSize > maxPageSize || m.PageSize&(m.PageSize-1) != 0 {
		return m, corrupt("page size %d", m.PageSize)
	}
	if m.PageCount < 1 || int64(m.PageCount)*int64(m.PageSize) > MaxDBSize {
		return m, corrupt("page count %d (page size %d) out of range", m.PageCount, m.PageSize)
	}
	if (m.Kind == KindBase) != (m.Parent == Hash{}) {
		return m, corrupt("a base has no parent and a delta has one")
	}
	np := int(u32())
	if np > len(r)/pieceRefSize || np > m.PageCount {
		return m, corrupt("%d pieces declared", np)
	}
	m.Pieces = make([]PieceRef, np)
	for i := range m.Pieces {
		m.Pieces[i].ID = hash()
		m.Pieces[i].Pages = int(u32())
		if m.Pieces[i].Pages < 1 || m.Pieces[i].Pages > MaxPiecePages {
			return m, corrupt("piece %d holds %d pages", i, m.Pieces[i].Pages)
		}
	}
	if len(r) < 4 {
		return m, corrupt("truncated before the page table")
	}
	n := int(u32())
	if n != len(r)/pageRefSize || len(r)%pageRefSize != 0 {
		return m, corrupt("%d pages declared, %d bytes left", n, len(r))
	}
	if n > m.PageCount || (m.Kind == KindBase && n != m.PageCount) {
		return m, corrupt("%d pages in a %s of %d pages", n, m.Kind, m.PageCount)
	}
	m.Pages = make([]PageRef, n)
	counts := make([]int, np)
	var prev uint32
	for i := range m.Pages {
		p := &m.Pages[i]
		p.Pgno = u32()
		p.Piece = int(u32())
		p.Hash = hash()
		if p.Pgno <= prev || int64(p.Pgno) > int64(m.PageCount) {
			return m, corrupt("page %d out of order or range", p.Pgno)
		}
		prev = p.Pgno
		if p.Piece >= np {
			return m, corrupt("page %d names piece %d of %d", p.Pgno, p.Piece, np)
		}
		counts[p.Piece]++
	}
	for i, c := range counts {
		if c != m.Pieces[i].Pages {
			return m, corrupt("piece %d: %d pages referenced, %d declared", i, c, m.Pieces[i].Pages)
		}
	}
	return m, nil
}

// SealManifest encodes m, sets m.ID to the sha256 of the encoding and returns it compressed and, with a key, encrypted as a
// bsnap/1 payload (whose header records the same sha256, so the id can be checked without the key).
func SealManifest(m *Manifest, key []byte) ([]byte, error) {
	plain := m.marshal()
	m.ID = sha256.Sum256(plain)
	out, _, err := snapshot.Encode(plain, key)
	if err != nil {
		return nil, fmt.Errorf("seal manifest: %w", err)
	}
	return out, nil
}

// OpenManifest is the strict decoder of a sealed manifest. Errors wrap ErrCorrupt, ErrWrongKey, ErrNeedKey or ErrPlaintext.
func OpenManifest(sealed []byte, key []byte) (Manifest, error) {
	plain, _, err := openPayload(sealed, key)
	if err != nil {
		return Manifest{}, fmt.Errorf("open manifest: %w", err)
	}
	m, err := parseManifest(plain)
	if err != nil {
		return Manifest{}, fmt.Errorf("open manifest: %w", err)
	}
	m.ID = sha256.Sum256(plain)
	return m, nil
}

// PeekID returns the id a sealed manifest or piece declares (the sha256 in its bsnap/1 header) without the key.
func PeekID(sealed []byte) (Hash, error) {
	meta, err := snapshot.PeekMeta(sealed)
	if err != nil {
		return Hash{}, err
	}
	return ParseHash(meta.SHA256)
}

// openPayload decodes a bsnap/1 payload, refusing plaintext under a key before inflating it. Decode has checked
// the plaintext against the sha256 in the header, which it returns.
func openPayload(sealed, key []byte) ([]byte, string, error) {
	meta, err := snapshot.PeekMeta(sealed)
	if err != nil {
		return nil, "", err
	}
	if key != nil && !meta.Encrypted {
		return nil, "", ErrPlaintext
	}
	plain, meta, err := snapshot.Decode(sealed, key)
	return plain, meta.SHA256, err
}

// Piece plaintext layout (big endian): magic "BINCRPC1" | page size u32 | count u32 | count × pgno u32 | pages.
const (
	pieceMagic = "BINCRPC1"
	pieceFixed = 8 + 4 + 4
)

// page is one page of a point.
type page struct {
	pgno uint32
	data []byte
}

// marshalPiece lays pages (sorted by pgno, all of pageSize bytes) out as a piece.
func marshalPiece(pageSize int, pages []page) []byte {
	b := make([]byte, 0, pieceFixed+len(pages)*(4+pageSize))
	b = append(b, pieceMagic...)
	b = binary.BigEndian.AppendUint32(b, uint32(pageSize))
	b = binary.BigEndian.AppendUint32(b, uint32(len(pages)))
	for _, p := range pages {
		b = binary.BigEndian.AppendUint32(b, p.pgno)
	}
	for _, p := range pages {
		b = append(b, p.data...)
	}
	return b
}

// parsePiece is the strict decoder of a piece's plaintext. The pages alias b.
func parsePiece(b []byte) (pageSize int, pages []page, err error) {
	if len(b) < pieceFixed || !bytes.Equal(b[:8], []byte(pieceMagic)) {
		return 0, nil, corrupt("not a bincr/1 piece")
	}
	pageSize = int(binary.BigEndian.Uint32(b[8:]))
	n := int(binary.BigEndian.Uint32(b[12:]))
	if pageSize < minPageSize || pageSize > maxPageSize || pageSize&(pageSize-1) != 0 {
		return 0, nil, corrupt("piece page size %d", pageSize)
	}
	if n < 1 || n > MaxPiecePages {
		return 0, nil, corrupt("piece holds %d pages", n)
	}
	if len(b) != pieceFixed+n*(4+pageSize) {
		return 0, nil, corrupt("piece is %d bytes, %d pages of %d need %d", len(b), n, pageSize, pieceFixed+n*(4+pageSize))
	}
	pages = make([]page, n)
	body := b[pieceFixed+4*n:]
	var prev uint32
	for i := range pages {
		pg := binary.BigEndian.Uint32(b[pieceFixed+4*i:])
		if pg <= prev || int64(pg) > maxPages {
			return 0, nil, corrupt("piece page %d out of order or range", pg)
		}
		prev = pg
		pages[i] = page{pgno: pg, data: body[i*pageSize : (i+1)*pageSize : (i+1)*pageSize]}
	}
	return pageSize, pages, nil
}

// openPiece decodes a sealed piece and checks it is the piece id names. Errors wrap ErrCorrupt, ErrWrongKey,
// ErrNeedKey or ErrPlaintext.
func openPiece(id Hash, sealed []byte, key []byte) (pageSize int, pages []page, err error) {
	plain, sum, err := openPayload(sealed, key)
	if err != nil {
		return 0, nil, fmt.Errorf("open piece %s: %w", id, err)
	}
	if sum != id.String() {
		return 0, nil, fmt.Errorf("open piece %s: %w", id, corrupt("content is another piece"))
	}
	pageSize, pages, err = parsePiece(plain)
	if err != nil {
		return 0, nil, fmt.Errorf("open piece %s: %w", id, err)
	}
	return pageSize, pages, nil
}
