package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// testKey returns a deterministic 32-byte key; b picks one of several.
func testKey(b byte) []byte {
	k := make([]byte, KeySize)
	for i := range k {
		k[i] = b + byte(i)*7
	}
	return k
}

// samplePlain looks like a session database: structured bytes (compressible) with random key material.
func samplePlain(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	out := make([]byte, 0, n)
	for len(out) < n {
		out = append(out, "SQLite format 3\x00whatsmeow_sessions"...)
		for range 32 {
			out = append(out, byte(r.Uint32()))
		}
		out = append(out, make([]byte, r.IntN(64))...)
	}
	return out[:n]
}

// mustEncode encodes or fails the test.
func mustEncode(t testing.TB, plain, key []byte) ([]byte, Meta) {
	t.Helper()
	p, m, err := Encode(plain, key)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	return p, m
}

// rewriteCRC recomputes the header checksum after a test edits the header on purpose.
func rewriteCRC(p []byte) {
	binary.BigEndian.PutUint32(p[offCRC:], crc32.Checksum(p[:offCRC], castagnoli))
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		size int
		key  []byte
	}{
		{"empty plain", 0, nil},
		{"empty encrypted", 0, testKey(1)},
		{"one byte", 1, nil},
		{"small plain", 4096, nil},
		{"small encrypted", 4096, testKey(1)},
		{"1MB plain", 1 << 20, nil},
		{"1MB encrypted", 1 << 20, testKey(2)},
		{"5MB encrypted (several zstd blocks and windows)", 5 << 20, testKey(3)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			plain := samplePlain(tc.size, uint64(tc.size))
			orig := bytes.Clone(plain)
			payload, meta := mustEncode(t, plain, tc.key)
			if !bytes.Equal(plain, orig) {
				t.Fatal("Encode modified its input")
			}
			sum := sha256.Sum256(plain)
			want := Meta{Format: FormatV1, SHA256: hex.EncodeToString(sum[:]), Size: int64(tc.size),
				Stored: int64(len(payload)), Encrypted: tc.key != nil}
			if meta != want {
				t.Fatalf("encode meta %+v, want %+v", meta, want)
			}
			peek, err := PeekMeta(payload)
			if err != nil || peek != want {
				t.Fatalf("PeekMeta = %+v, %v; want %+v", peek, err, want)
			}
			before := bytes.Clone(payload)
			got, dmeta, err := Decode(payload, tc.key)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("decoded bytes differ from the original")
			}
			if dmeta != want {
				t.Fatalf("decode meta %+v, want %+v", dmeta, want)
			}
			if !bytes.Equal(payload, before) {
				t.Fatal("Decode modified the payload")
			}
			if tc.key != nil && tc.size > 64 && bytes.Contains(payload, plain[:64]) {
				t.Fatal("encrypted payload contains plaintext")
			}
		})
	}
}

func TestEncryptedPayloadsDifferButShareSHA(t *testing.T) {
	t.Parallel()
	plain := samplePlain(10000, 7)
	a, ma := mustEncode(t, plain, testKey(1))
	b, mb := mustEncode(t, plain, testKey(1))
	if bytes.Equal(a, b) {
		t.Fatal("two encryptions of the same store are identical: nonce reused")
	}
	if ma.SHA256 != mb.SHA256 {
		t.Fatal("sha256 of the same plain store differs")
	}
	// Plaintext encoding is deterministic, so the payload itself can be compared too.
	c, _ := mustEncode(t, plain, nil)
	d, _ := mustEncode(t, plain, nil)
	if !bytes.Equal(c, d) {
		t.Fatal("plaintext encoding is not deterministic")
	}
}

func TestPlaintextPayloadDecodesWithKey(t *testing.T) {
	t.Parallel()
	plain := samplePlain(3000, 1)
	payload, _ := mustEncode(t, plain, nil)
	got, meta, err := Decode(payload, testKey(1))
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("decode plaintext payload with a key: %v", err)
	}
	if meta.Encrypted {
		t.Fatal("meta says encrypted for a plaintext payload")
	}
}

// TestDecodeRejects is the corruption table: every damaged payload gives the right sentinel and no data.
func TestDecodeRejects(t *testing.T) {
	t.Parallel()
	plain := samplePlain(200_000, 3)
	key := testKey(1)
	enc, _ := mustEncode(t, plain, key)
	clear, _ := mustEncode(t, plain, nil)

	type tc struct {
		name    string
		payload []byte
		key     []byte
		want    error
		msg     string // substring the error must contain
	}
	var cases []tc
	edit := func(p []byte, f func([]byte)) []byte {
		q := bytes.Clone(p)
		f(q)
		return q
	}
	for _, v := range []struct {
		label   string
		payload []byte
		key     []byte
	}{{"plain", clear, nil}, {"encrypted", enc, key}} {
		// Every single header byte is covered, by the checksum and (when encrypted) the AEAD.
		for off := range headerSize {
			cases = append(cases, tc{
				name:    v.label + "/flip header byte " + itoa(off),
				payload: edit(v.payload, func(q []byte) { q[off] ^= 0x01 }),
				key:     v.key, want: ErrCorrupt,
			})
		}
		n := len(v.payload)
		for _, off := range []int{headerSize, headerSize + 1, headerSize + 100, n / 2, n - 17, n - 16, n - 1} {
			cases = append(cases, tc{
				name:    v.label + "/flip body byte " + itoa(off),
				payload: edit(v.payload, func(q []byte) { q[off] ^= 0x80 }),
				key:     v.key, want: ErrCorrupt,
			})
		}
		for _, cut := range []int{0, 1, 7, 8, 40, headerSize - 1, headerSize, headerSize + 1, headerSize + 20, n / 3, n / 2, n - 17, n - 16, n - 1} {
			cases = append(cases, tc{
				name:    v.label + "/truncated at " + itoa(cut),
				payload: bytes.Clone(v.payload[:cut]),
				key:     v.key, want: ErrCorrupt,
			})
		}
		cases = append(cases,
			tc{name: v.label + "/trailing garbage", payload: append(bytes.Clone(v.payload), 1, 2, 3, 4), key: v.key, want: ErrCorrupt},
			tc{name: v.label + "/trailing second zstd frame",
				payload: append(bytes.Clone(v.payload), zstdFrame([]byte("x"))...), key: v.key, want: ErrCorrupt},
			tc{name: v.label + "/unknown version", payload: edit(v.payload, func(q []byte) { q[offVersion] = 2; rewriteCRC(q) }),
				key: v.key, want: ErrCorrupt, msg: "unsupported format version 2"},
			tc{name: v.label + "/unknown flag", payload: edit(v.payload, func(q []byte) { q[offFlags] |= 0x80; rewriteCRC(q) }),
				key: v.key, want: ErrCorrupt},
			tc{name: v.label + "/unknown compression", payload: edit(v.payload, func(q []byte) { q[offComp] = 9; rewriteCRC(q) }),
				key: v.key, want: ErrCorrupt},
			tc{name: v.label + "/declared size over the limit",
				payload: edit(v.payload, func(q []byte) { binary.BigEndian.PutUint64(q[offSize:], MaxPlainSize+1); rewriteCRC(q) }),
				key:     v.key, want: ErrCorrupt},
			tc{name: v.label + "/declared size one less",
				payload: edit(v.payload, func(q []byte) {
					binary.BigEndian.PutUint64(q[offSize:], binary.BigEndian.Uint64(q[offSize:])-1)
					rewriteCRC(q)
				}),
				key: v.key, want: ErrCorrupt},
			// With the checksum fixed up, the AEAD (header as additional data) or the sha256 must still catch it.
			tc{name: v.label + "/sha changed with valid header checksum",
				payload: edit(v.payload, func(q []byte) { q[offSHA] ^= 1; rewriteCRC(q) }), key: v.key, want: ErrCorrupt,
				msg: map[bool]string{true: "authentication failed", false: "sha256 mismatch"}[v.key != nil]},
			tc{name: v.label + "/nonce changed with valid header checksum",
				payload: edit(v.payload, func(q []byte) {
					if v.key != nil {
						q[offNonce] ^= 1
					} else {
						q[offNonce] = 1 // a nonce on a plaintext payload is itself malformed
					}
					rewriteCRC(q)
				}), key: v.key, want: ErrCorrupt},
			tc{name: v.label + "/bad magic", payload: edit(v.payload, func(q []byte) { copy(q, "SQLite f"); rewriteCRC(q) }),
				key: v.key, want: ErrCorrupt, msg: "bad magic"},
		)
	}
	cases = append(cases,
		tc{name: "not a payload at all: a raw SQLite file", payload: append([]byte("SQLite format 3\x00"), make([]byte, 4096)...), want: ErrCorrupt},
		tc{name: "encrypted/no key", payload: enc, key: nil, want: ErrNeedKey, msg: "SESSION_ENCRYPTION_KEY"},
		tc{name: "encrypted/wrong key", payload: enc, key: testKey(9), want: ErrWrongKey, msg: "SESSION_ENCRYPTION_KEY"},
		tc{name: "encrypted/short key", payload: enc, key: key[:16], want: ErrBadKey, msg: "SESSION_ENCRYPTION_KEY"},
		// A plaintext payload relabelled as encrypted (flag set, checksum fixed) must not read as a key problem.
		tc{name: "plain relabelled as encrypted with a matching key id", payload: edit(clear, func(q []byte) {
			q[offFlags] = flagEncrypted
			_, id, _ := deriveKeys(key)
			copy(q[offKeyID:], id[:])
			rewriteCRC(q)
		}), key: key, want: ErrCorrupt, msg: "authentication failed"},
		tc{name: "encrypted relabelled as plain", payload: edit(enc, func(q []byte) {
			q[offFlags] = 0
			copy(q[offKeyID:offCRC], make([]byte, offCRC-offKeyID))
			rewriteCRC(q)
		}), key: key, want: ErrCorrupt},
	)

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got, _, err := Decode(c.payload, c.key)
			if got != nil {
				t.Fatalf("Decode returned %d bytes with error %v", len(got), err)
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("error %v, want %v", err, c.want)
			}
			if c.msg != "" && !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %q does not mention %q", err, c.msg)
			}
			for _, k := range [][]byte{key, testKey(9)} {
				for _, s := range []string{hex.EncodeToString(k), base64.StdEncoding.EncodeToString(k), string(k)} {
					if strings.Contains(err.Error(), s) {
						t.Fatalf("error %q contains a key", err)
					}
				}
			}
		})
	}
}

func TestEncodeRejectsBadKey(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 16, 31, 33, 64} {
		_, _, err := Encode([]byte("x"), make([]byte, n))
		if !errors.Is(err, ErrBadKey) {
			t.Errorf("key of %d bytes: error %v, want ErrBadKey", n, err)
		}
	}
}

// TestDecodeBoundsMemory: a small payload whose zstd data inflates far beyond the declared size is refused
// without inflating it, whether or not the frame states its content size.
func TestDecodeBoundsMemory(t *testing.T) {
	zeros := make([]byte, 64<<20)
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"frame with content size", zstdFrame(zeros)},
		{"streamed frame without content size", zstdStream(t, zeros)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h header
			h.size = 1 << 10
			hdr := h.marshal()
			payload := append(hdr[:], tc.body...)
			if len(payload) > 64<<10 {
				t.Fatalf("bomb is %d bytes, expected a few KB", len(payload))
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			got, _, err := Decode(payload, nil)
			runtime.ReadMemStats(&after)
			if got != nil || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Decode = %d bytes, %v; want ErrCorrupt", len(got), err)
			}
			// Not parallel, so the count is Decode's own (plus the runtime's noise); the bomb is 64 MB.
			if d := after.TotalAlloc - before.TotalAlloc; d > 8<<20 {
				t.Fatalf("Decode allocated %d KB for a bomb declared as 1 KB", d>>10)
			}
		})
	}
}

// zstdStream compresses b with the streaming encoder, which does not write the content size.
func zstdStream(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// zstdFrame compresses b as a standalone frame.
func zstdFrame(b []byte) []byte {
	return encoder.EncodeAll(b, nil)
}

// TestHeaderLayoutIsStable pins the v1 header: stored snapshots must stay readable by later builds.
func TestHeaderLayoutIsStable(t *testing.T) {
	t.Parallel()
	payload, _ := mustEncode(t, []byte("hello"), nil)
	if got := string(payload[:8]); got != "BSKYSNAP" {
		t.Fatalf("magic %q", got)
	}
	if payload[offVersion] != 1 || payload[offFlags] != 0 || payload[offComp] != 1 {
		t.Fatalf("version/flags/compression bytes % x", payload[8:12])
	}
	if got := binary.BigEndian.Uint64(payload[offSize:]); got != 5 {
		t.Fatalf("size %d", got)
	}
	sum := sha256.Sum256([]byte("hello"))
	if !bytes.Equal(payload[offSHA:offSHA+32], sum[:]) {
		t.Fatal("sha256 not at offset 20")
	}
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	body, err := dec.DecodeAll(payload[headerSize:], nil)
	if err != nil || string(body) != "hello" {
		t.Fatalf("body is not a plain zstd frame of the input: %q, %v", body, err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
