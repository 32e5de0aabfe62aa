package incr

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/services/backup/snapshot"
)

const crashEnv = "INCR_CRASH_CHILD_DIR"

// crashChild restores the two chains stored under dir into dir/session.db, alternately, forever, printing a line
// after each. It runs in a child process that the test kills.
func crashChild(dir string) {
	ps, err := NewDirStore(filepath.Join(dir, "pieces"))
	if err != nil {
		panic(err)
	}
	var chains [2][][]byte
	for c := range chains {
		for i := 0; ; i++ {
			b, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("chain%d-%d", c, i)))
			if err != nil {
				break
			}
			chains[c] = append(chains[c], b)
		}
	}
	for i := 0; ; i++ {
		if _, err := Restore(context.Background(), filepath.Join(dir, "session.db"), chains[i%2], RestoreOptions{Key: testKey(5), Pieces: ps}); err != nil {
			panic(err)
		}
		fmt.Println("restored", i)
	}
}

// SIGKILL at random moments of restores that replace the same file: the file is always one whole verified point,
// never a mix and never a store with a foreign WAL.
func TestRestoreIsAtomicUnderSIGKILL(t *testing.T) {
	if dir := os.Getenv(crashEnv); dir != "" {
		crashChild(dir)
		return
	}
	f := newChain(t, 1)
	dir := t.TempDir()
	ps, err := NewDirStore(filepath.Join(dir, "pieces"))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range f.ps.IDs() {
		b, _ := f.ps.Get(t.Context(), id)
		if err := ps.Put(t.Context(), id, b); err != nil {
			t.Fatal(err)
		}
	}
	chains := [2][][]byte{f.sealed[:2], f.sealed}
	want := map[Hash]bool{f.points[1].Manifest.DBHash: true, f.points[3].Manifest.DBHash: true}
	for c, ch := range chains {
		for i, b := range ch {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("chain%d-%d", c, i)), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	target := filepath.Join(dir, "session.db")
	for round := range 6 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRestoreIsAtomicUnderSIGKILL$")
		cmd.Env = append(os.Environ(), crashEnv+"="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := bufio.NewScanner(out)
		n := 1 + rand.IntN(3)
		for range n {
			if !lines.Scan() {
				t.Fatalf("child stopped: %v", lines.Err())
			}
		}
		// Kill somewhere inside the next restore (one takes a few milliseconds here).
		<-time.After(time.Duration(rand.IntN(4000)) * time.Microsecond)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if got := fileDBHash(t, target, 4096); !want[got] {
			t.Fatalf("round %d: the store is neither point after SIGKILL", round)
		}
		for _, side := range []string{"-wal", "-shm", "-journal"} {
			if _, err := os.Stat(target + side); err == nil {
				t.Fatalf("round %d: %s left next to the restored store", round, side)
			}
		}
		if err := snapshot.Check(t.Context(), target); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		// Check may have created side files; the next round's restore must find none.
		for _, side := range []string{"-wal", "-shm"} {
			_ = os.Remove(target + side)
		}
		t.Logf("round %d: killed after %d restores", round, n)
	}
}
