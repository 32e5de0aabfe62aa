package snapshot

import (
	"errors"
	"strings"
	"testing"
)

// A header that declares more than a session store can be is refused from
// the header alone, before zstd is given a memory budget that large.
func TestDeclaredSizeOverASessionStoreIsRefused(t *testing.T) {
	t.Parallel()
	if MaxPlainSize > 256<<20 {
		t.Fatalf("MaxPlainSize = %d MB; a session store is far smaller and a 512 MB dyno cannot hold more", MaxPlainSize>>20)
	}
	var h header
	h.size = 300 << 20
	hdr := h.marshal()
	payload := append(hdr[:], zstdFrame([]byte("x"))...)
	got, _, err := Decode(payload, nil)
	if got != nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("Decode of a header declaring 300 MB = %d bytes, %v; want ErrCorrupt naming the limit", len(got), err)
	}
	if _, err := PeekMeta(payload); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("PeekMeta = %v; want ErrCorrupt", err)
	}
}
