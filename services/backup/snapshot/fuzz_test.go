package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"testing"
)

// FuzzSnapshotDecode feeds the decoder arbitrary payloads (seeded with valid plain and encrypted ones). It must
// never panic, never return data with an error, only fail with the package's sentinels, and whatever it accepts
// must match its own header.
func FuzzSnapshotDecode(f *testing.F) {
	key := testKey(1)
	for _, plain := range [][]byte{nil, []byte("x"), samplePlain(5000, 1), samplePlain(70_000, 2)} {
		for _, k := range [][]byte{nil, key} {
			p, _, err := Encode(plain, k)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(p, k != nil)
		}
	}
	f.Add([]byte(magic), false)
	f.Add([]byte{}, true)

	f.Fuzz(func(t *testing.T, payload []byte, withKey bool) {
		var k []byte
		if withKey {
			k = key
		}
		orig := bytes.Clone(payload)
		peek, perr := PeekMeta(payload)
		plain, meta, err := Decode(payload, k)
		if !bytes.Equal(payload, orig) {
			t.Fatal("Decode modified the payload")
		}
		if err != nil {
			if plain != nil {
				t.Fatalf("Decode returned %d bytes with error %v", len(plain), err)
			}
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrWrongKey) && !errors.Is(err, ErrNeedKey) {
				t.Fatalf("error outside the sentinels: %v", err)
			}
			return
		}
		if perr != nil {
			t.Fatalf("Decode accepted a payload PeekMeta rejects: %v", perr)
		}
		if meta != peek {
			t.Fatalf("Decode meta %+v, PeekMeta %+v", meta, peek)
		}
		sum := sha256.Sum256(plain)
		if hex.EncodeToString(sum[:]) != meta.SHA256 || int64(len(plain)) != meta.Size || meta.Stored != int64(len(payload)) {
			t.Fatalf("accepted payload does not match its header: %+v", meta)
		}
		if meta.Encrypted && !withKey {
			t.Fatal("encrypted payload decoded without a key")
		}
	})
}
