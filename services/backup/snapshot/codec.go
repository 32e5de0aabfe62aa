// Package snapshot turns a live WhatsApp session store (SQLite) into a self-describing, verified snapshot payload
// and back: consistent copy, zstd, optional AES-256-GCM, checksum.
package snapshot

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/klauspost/compress/zstd"
)

// FormatV1 is the value stored in blacksky_snapshots.format for payloads written by this package.
const FormatV1 = "bsnap/1"

// MaxPlainSize bounds the declared size of a session database in a payload, so a hostile or corrupt header cannot
// make Decode allocate more than this. A real whatsmeow store is a few MB to tens of MB (the largest we measured,
// 113 MB, was a synthetic one); 256 MB leaves room and still fits next to the bot on a 512 MB dyno.
const MaxPlainSize = 256 << 20

// KeySize is the length of SESSION_ENCRYPTION_KEY once decoded.
const KeySize = 32

var (
	// ErrCorrupt means the payload is damaged: bad header, truncated, checksum mismatch, zstd error or failed
	// authentication under the right key. The restore flow skips such a snapshot and tries the next older one.
	ErrCorrupt = errors.New("snapshot payload is corrupt")
	// ErrWrongKey means the payload was encrypted under another key. Restore must stop rather than skip: every
	// older snapshot will most likely fail the same way, and the operator has to fix the variable.
	ErrWrongKey = errors.New("snapshot was encrypted with a different SESSION_ENCRYPTION_KEY")
	// ErrNeedKey means the payload is encrypted but no key was given.
	ErrNeedKey = errors.New("snapshot is encrypted but SESSION_ENCRYPTION_KEY is not set")
	// ErrBadKey means the key given is not 32 bytes long.
	ErrBadKey = errors.New("SESSION_ENCRYPTION_KEY must be 32 bytes")
)

// Meta describes a payload. It is what the backup service records next to the payload.
type Meta struct {
	Format    string // FormatV1
	SHA256    string // hex sha256 of the PLAIN session database bytes
	Size      int64  // plain size
	Stored    int64  // len(payload)
	Encrypted bool
}

// Header layout of format version 1 (integers big endian). It is fixed-size so PeekMeta and Decode can check it
// before touching the body, and it is the AEAD additional data, so no header field can be altered undetected.
//
//	off len
//	  0   8  magic "BSKYSNAP"
//	  8   1  version (1)
//	  9   1  flags: bit 0 = encrypted; other bits must be zero
//	 10   1  compression: 1 = zstd
//	 11   1  reserved, zero
//	 12   8  plain size
//	 20  32  sha256 of the plain database
//	 52   8  key id: first 8 bytes of HKDF(key, "key-id"); zero when not encrypted
//	 60  12  AES-GCM nonce; zero when not encrypted
//	 72   4  CRC-32C of bytes 0..71
//	 76      body: zstd frame, or AES-256-GCM(zstd frame) with a 16-byte tag
//
// The key id lets Decode tell a wrong key (ErrWrongKey: stop and fix the configuration) from a damaged payload
// (ErrCorrupt: try an older snapshot); AEAD failure alone cannot tell them apart. It is derived through HKDF with
// its own label, so it reveals nothing usable about the key. The CRC makes a damaged key id read as corruption, not
// as a wrong key.
const (
	magic      = "BSKYSNAP"
	version1   = 1
	headerSize = 76

	flagEncrypted = 0x01
	compZstd      = 1

	offVersion = 8
	offFlags   = 9
	offComp    = 10
	offResv    = 11
	offSize    = 12
	offSHA     = 20
	offKeyID   = 52
	offNonce   = 60
	offCRC     = 72

	keyIDSize = 8
	nonceSize = 12
	tagSize   = 16
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// encoder is shared: zstd.Encoder.EncodeAll is safe for concurrent use. One goroutine per call keeps the backup
// worker from taking both cores of a small dyno away from the gateway.
var encoder = func() *zstd.Encoder {
	e, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderCRC(true))
	if err != nil {
		panic(fmt.Sprintf("snapshot: zstd encoder: %v", err)) // only on invalid static options
	}
	return e
}()

// header is the parsed fixed header.
type header struct {
	encrypted bool
	size      uint64
	sha       [32]byte
	keyID     [keyIDSize]byte
	nonce     [nonceSize]byte
}

// Encode compresses (zstd) and, when key is non-nil (32 bytes), encrypts plain. The payload starts with a header
// (magic, version, flags, plain size, sha256 of plain) so Decode can check everything before returning anything.
// The header is the AEAD additional data when encrypted.
func Encode(plain []byte, key []byte) ([]byte, Meta, error) {
	if uint64(len(plain)) > MaxPlainSize {
		return nil, Meta{}, fmt.Errorf("encode snapshot: session database is %d bytes, more than the %d-byte limit", len(plain), uint64(MaxPlainSize))
	}
	var aead cipher.AEAD
	h := header{size: uint64(len(plain)), sha: sha256.Sum256(plain)}
	if key != nil {
		var err error
		aead, h.keyID, err = deriveKeys(key)
		if err != nil {
			return nil, Meta{}, fmt.Errorf("encode snapshot: %w", err)
		}
		h.encrypted = true
		if _, err := rand.Read(h.nonce[:]); err != nil {
			return nil, Meta{}, fmt.Errorf("encode snapshot: nonce: %w", err)
		}
	}

	hdr := h.marshal()
	out := make([]byte, headerSize, headerSize+encoder.MaxEncodedSize(len(plain))+tagSize)
	copy(out, hdr[:])
	out = encoder.EncodeAll(plain, out)
	if aead != nil {
		// Seal in place: the compressed body is overwritten by the ciphertext (exact overlap is allowed).
		body := out[headerSize:]
		out = aead.Seal(out[:headerSize], h.nonce[:], body, hdr[:])
	}
	return out, h.meta(len(out)), nil
}

// Decode verifies and returns the plain bytes. It never returns partial data: on any problem the result is nil and
// the error wraps ErrCorrupt, ErrWrongKey, ErrNeedKey or ErrBadKey. A plaintext payload decodes whether or not a
// key is given: a caller that refuses plaintext under a key reads PeekMeta first, so it refuses before inflating.
func Decode(payload []byte, key []byte) ([]byte, Meta, error) {
	h, err := parseHeader(payload)
	if err != nil {
		return nil, Meta{}, err
	}
	meta := h.meta(len(payload))
	body := payload[headerSize:]

	if h.encrypted {
		if key == nil {
			return nil, meta, ErrNeedKey
		}
		aead, keyID, err := deriveKeys(key)
		if err != nil {
			return nil, meta, fmt.Errorf("decode snapshot: %w", err)
		}
		if subtle.ConstantTimeCompare(keyID[:], h.keyID[:]) != 1 {
			return nil, meta, ErrWrongKey
		}
		if len(body) < tagSize {
			return nil, meta, fmt.Errorf("%w: encrypted body shorter than its tag", ErrCorrupt)
		}
		// Open into a fresh buffer: the caller's payload is never modified.
		body, err = aead.Open(make([]byte, 0, len(body)-tagSize), h.nonce[:], body, payload[:headerSize])
		if err != nil {
			// The key id matched, so the key is right and the ciphertext or header was altered.
			return nil, meta, fmt.Errorf("%w: authentication failed", ErrCorrupt)
		}
	}

	plain, err := decompress(body, h.size)
	if err != nil {
		return nil, meta, err
	}
	if sum := sha256.Sum256(plain); sum != h.sha {
		return nil, meta, fmt.Errorf("%w: sha256 mismatch", ErrCorrupt)
	}
	return plain, meta, nil
}

// PeekMeta reads only the header (format, sizes, sha, encrypted flag) without decrypting or decompressing.
func PeekMeta(payload []byte) (Meta, error) {
	h, err := parseHeader(payload)
	if err != nil {
		return Meta{}, err
	}
	return h.meta(len(payload)), nil
}

// decodeFloor is the smallest output limit given to zstd.
const decodeFloor = 1 << 20

// decompress inflates exactly one declared size worth of data. WithDecoderMaxMemory makes zstd refuse (before
// allocating) a frame that claims to be larger than the header said, and stop inflating one that does not say, so a
// hostile payload cannot make us allocate more than the declared size (bounded by MaxPlainSize) or 1 MB.
func decompress(body []byte, size uint64) ([]byte, error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("%w: empty body", ErrCorrupt)
	}
	// The limit also caps the window, and zstd may declare a window larger than a tiny input: hence the floor.
	// The exact length is checked below.
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(max(size, decodeFloor)))
	if err != nil {
		return nil, fmt.Errorf("decode snapshot: zstd decoder: %w", err)
	}
	defer dec.Close()
	plain, err := dec.DecodeAll(body, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
	}
	if uint64(len(plain)) != size {
		return nil, fmt.Errorf("%w: decompressed %d bytes, header says %d", ErrCorrupt, len(plain), size)
	}
	return plain, nil
}

func parseHeader(p []byte) (header, error) {
	var h header
	if len(p) < headerSize {
		return h, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrCorrupt, len(p), headerSize)
	}
	if string(p[:len(magic)]) != magic {
		return h, fmt.Errorf("%w: not a blacksky snapshot (bad magic)", ErrCorrupt)
	}
	if got, want := binary.BigEndian.Uint32(p[offCRC:]), crc32.Checksum(p[:offCRC], castagnoli); got != want {
		return h, fmt.Errorf("%w: header checksum mismatch", ErrCorrupt)
	}
	if v := p[offVersion]; v != version1 {
		return h, fmt.Errorf("%w: unsupported format version %d (written by a newer blacksky?)", ErrCorrupt, v)
	}
	if f := p[offFlags]; f&^flagEncrypted != 0 {
		return h, fmt.Errorf("%w: unknown flags %#02x", ErrCorrupt, f)
	}
	if c := p[offComp]; c != compZstd {
		return h, fmt.Errorf("%w: unknown compression %d", ErrCorrupt, c)
	}
	if p[offResv] != 0 {
		return h, fmt.Errorf("%w: reserved byte set", ErrCorrupt)
	}
	h.encrypted = p[offFlags]&flagEncrypted != 0
	h.size = binary.BigEndian.Uint64(p[offSize:])
	if h.size > MaxPlainSize {
		return h, fmt.Errorf("%w: declared size %d over the %d-byte limit", ErrCorrupt, h.size, uint64(MaxPlainSize))
	}
	copy(h.sha[:], p[offSHA:])
	copy(h.keyID[:], p[offKeyID:])
	copy(h.nonce[:], p[offNonce:])
	if !h.encrypted && (!allZero(h.keyID[:]) || !allZero(h.nonce[:])) {
		return h, fmt.Errorf("%w: key id or nonce set on a plaintext payload", ErrCorrupt)
	}
	return h, nil
}

func (h header) marshal() [headerSize]byte {
	var b [headerSize]byte
	copy(b[:], magic)
	b[offVersion] = version1
	if h.encrypted {
		b[offFlags] = flagEncrypted
	}
	b[offComp] = compZstd
	binary.BigEndian.PutUint64(b[offSize:], h.size)
	copy(b[offSHA:], h.sha[:])
	copy(b[offKeyID:], h.keyID[:])
	copy(b[offNonce:], h.nonce[:])
	binary.BigEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
	return b
}

func (h header) meta(stored int) Meta {
	return Meta{
		Format:    FormatV1,
		SHA256:    hex.EncodeToString(h.sha[:]),
		Size:      int64(h.size),
		Stored:    int64(stored),
		Encrypted: h.encrypted,
	}
}

// deriveKeys splits SESSION_ENCRYPTION_KEY into the AES-256-GCM key and the key id, so the id stored in clear
// never is a function of the very key AES uses.
func deriveKeys(key []byte) (cipher.AEAD, [keyIDSize]byte, error) {
	var id [keyIDSize]byte
	if len(key) != KeySize {
		return nil, id, fmt.Errorf("%w, got %d", ErrBadKey, len(key))
	}
	encKey, err := hkdf.Key(sha256.New, key, nil, "blacksky snapshot v1 aes-256-gcm", 32)
	if err != nil {
		return nil, id, fmt.Errorf("derive key: %w", err)
	}
	idKey, err := hkdf.Key(sha256.New, key, nil, "blacksky snapshot v1 key-id", keyIDSize)
	if err != nil {
		return nil, id, fmt.Errorf("derive key id: %w", err)
	}
	copy(id[:], idKey)
	block, err := aes.NewCipher(encKey)
	if err != nil {
		return nil, id, fmt.Errorf("aes: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, id, fmt.Errorf("gcm: %w", err)
	}
	return aead, id, nil
}

func allZero(b []byte) bool {
	return bytes.Count(b, []byte{0}) == len(b)
}
