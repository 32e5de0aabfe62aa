package relay

import (
	"encoding/json"
	"fmt"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

// Codec seals what relay stores (messages, receipts, sends) with
// SESSION_ENCRYPTION_KEY: the snapshot payload format of the backup service
// (zstd, AES-256-GCM under a key derived from it, a header that tells a
// wrong key from damage), so there is one piece of crypto in the product.
// Without a key the payload is compressed but plaintext.
type Codec struct {
	Key []byte // 32 bytes, or nil
}

// Seal encodes v as JSON and seals it.
func (c Codec) Seal(v any) ([]byte, error) {
	plain, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	out, _, err := snapshot.Encode(plain, c.Key)
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	return out, nil
}

// Open verifies and decrypts a payload into v. A payload sealed under
// another key fails with snapshot.ErrWrongKey.
func (c Codec) Open(payload []byte, v any) error {
	plain, _, err := snapshot.Decode(payload, c.Key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(plain, v); err != nil {
		return fmt.Errorf("stored payload: %w", err)
	}
	return nil
}
