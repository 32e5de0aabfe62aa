package snapshot

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
)

// TestReadAfterCrashWithWAL: a gateway killed hard leaves committed transactions only in session.db-wal (and
// maybe no -shm). Check, HasDevice and ReadConsistent must see them: treating such a store as damaged, or copying
// it without its WAL, would restore or store an older session.
func TestReadAfterCrashWithWAL(t *testing.T) {
	t.Parallel()
	for _, withShm := range []bool{true, false} {
		name := "without -shm"
		if withShm {
			name = "with -shm"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			src := newStore(t, 1<<20)
			live := openLive(t, src) // keeps the WAL from being checkpointed on close
			w, err := wastore.StartWriter(ctx, src)
			if err != nil {
				t.Fatal(err)
			}
			testwait.For(t, 10*time.Second, "100 committed writes", func() bool { return w.Last() >= 100 })
			last, err := w.Stop()
			if err != nil {
				t.Fatal(err)
			}
			// "Crash": copy the files while the store is still open, as a kill -9 leaves them.
			path := filepath.Join(t.TempDir(), "session.db")
			sides := []string{"", "-wal"}
			if withShm {
				sides = append(sides, "-shm")
			}
			for _, side := range sides {
				b, err := os.ReadFile(src + side)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path+side, b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_ = live.Close()

			// The test only means something if the main file alone lacks some of the rows.
			alone := filepath.Join(t.TempDir(), "alone.db")
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(alone, b, 0o600); err != nil {
				t.Fatal(err)
			}
			if n, _, err := wastore.Writes(ctx, alone); err == nil && n >= last {
				t.Fatalf("the main file alone holds all %d rows: nothing was left in the WAL", n)
			}

			if err := Check(ctx, path); err != nil {
				t.Fatalf("Check: %v", err)
			}
			if has, err := HasDevice(ctx, path); err != nil || !has {
				t.Fatalf("HasDevice = %v, %v", has, err)
			}
			data, err := ReadConsistent(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			restored := filepath.Join(t.TempDir(), "session.db")
			if err := WriteFileAtomic(restored, data, 0o600); err != nil {
				t.Fatal(err)
			}
			count, maxN, err := wastore.Writes(ctx, restored)
			if err != nil {
				t.Fatal(err)
			}
			if count != last || maxN != last {
				t.Fatalf("copy holds %d rows (max %d), the WAL had %d", count, maxN, last)
			}
		})
	}
}
