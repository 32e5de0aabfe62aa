package sandbox

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
)

// seeder derives every id, key and jitter of the sandbox from its seed: the
// n-th draw of a label in a run is the same for the same seed. Each label
// counts its own draws, so goroutines drawing other labels (delivery,
// sends, keepalives) do not shift the ids of an inject sequence. Draws are
// numbered within the boot count (kept in the server file), so a restarted
// process never hands out an id an earlier run already used.
type seeder struct {
	key  [32]byte
	boot uint64
	n    sync.Map // label -> *atomic.Uint64
}

func newSeeder(seed string, boot uint64) *seeder {
	return &seeder{key: sha256.Sum256([]byte("blacksky-sandbox:" + seed)), boot: boot}
}

// next is the number of label's next draw.
func (s *seeder) next(label string) uint64 {
	n, ok := s.n.Load(label)
	if !ok {
		n, _ = s.n.LoadOrStore(label, new(atomic.Uint64))
	}
	return n.(*atomic.Uint64).Add(1)
}

// rng returns a generator for one draw labelled label.
func (s *seeder) rng(label string) *rand.Rand {
	h := sha256.New()
	h.Write(s.key[:])
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], s.boot)
	binary.BigEndian.PutUint64(b[8:], s.next(label))
	h.Write(b[:])
	h.Write([]byte(label))
	var k [32]byte
	copy(k[:], h.Sum(nil))
	return rand.New(rand.NewChaCha8(k))
}

// keyed returns a generator that depends only on the seed and label, not on
// the draw count: a contact's identity key is the same in every run.
func (s *seeder) keyed(label string) *rand.Rand {
	k := sha256.Sum256(append(s.key[:], label...))
	return rand.New(rand.NewChaCha8(k))
}

func fill(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func (s *seeder) bytes(label string, n int) []byte { return fill(s.rng(label), n) }

// key32 is a 32-byte private key.
func (s *seeder) key32(label string) [32]byte {
	var k [32]byte
	copy(k[:], s.bytes(label, 32))
	return k
}

// incomingID looks like the id an Android phone gives a message.
func (s *seeder) incomingID() string {
	return strings.ToUpper(hex.EncodeToString(s.bytes("incoming-id", 16)))
}

// outgoingID has whatsmeow's own form: "3EB0" and 18 hex characters.
func (s *seeder) outgoingID() string {
	return "3EB0" + strings.ToUpper(hex.EncodeToString(s.bytes("outgoing-id", 9)))
}

// pairCodeAlphabet is the one WhatsApp uses for linking codes.
const pairCodeAlphabet = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"

func (s *seeder) pairCode() string {
	r := s.rng("pair-code")
	var b strings.Builder
	for i := range 8 {
		if i == 4 {
			b.WriteByte('-')
		}
		b.WriteByte(pairCodeAlphabet[r.IntN(len(pairCodeAlphabet))])
	}
	return b.String()
}

// digits returns n decimal digits.
func (s *seeder) digits(label string, n int) string {
	r := s.rng(label)
	var b strings.Builder
	for range n {
		b.WriteByte(byte('0' + r.IntN(10)))
	}
	return b.String()
}
