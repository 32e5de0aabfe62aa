package snapshot

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
)

// newStore creates a linked whatsmeow store of size bytes in a fresh directory and returns its path.
func newStore(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "session.db")
	if err := wastore.Create(t.Context(), path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// dirNames lists the file names in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// openLive opens the store the way the gateway does and keeps WAL frames un-checkpointed, so readers must take
// pages from the WAL.
func openLive(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", wastore.DSN(path)+"&_pragma=wal_autocheckpoint(0)")
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = db.Close() })
	if err := db.PingContext(t.Context()); err != nil {
		t.Fatal(err)
	}
	return db
}

// TestReadConsistentUnderWrites: copies taken while a writer keeps committing hold a committed prefix of its rows
// (no gap, nothing uncommitted), include everything committed before the copy started, and pass integrity_check.
func TestReadConsistentUnderWrites(t *testing.T) {
	t.Parallel()
	path := newStore(t, 4<<20)
	w, err := wastore.StartWriter(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = w.Stop() }()

	key := testKey(5)
	var prev int64
	for i := range 5 {
		testwait.For(t, 10*time.Second, "20 more committed writes", func() bool { return w.Last() >= prev+20 })
		before := w.Last()
		data, err := ReadConsistent(t.Context(), path)
		if err != nil {
			t.Fatal(err)
		}
		after := w.Last()

		// Through the codec, as the backup service does, then restore into a new place.
		payload, _, err := Encode(data, key)
		if err != nil {
			t.Fatal(err)
		}
		plain, _, err := Decode(payload, key)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		has, err := Verify(t.Context(), plain, dir)
		if err != nil || !has {
			t.Fatalf("copy %d: Verify = %v, %v", i, has, err)
		}
		restored := filepath.Join(dir, "session.db")
		if err := WriteFileAtomic(restored, plain, 0o600); err != nil {
			t.Fatal(err)
		}
		count, maxN, err := wastore.Writes(t.Context(), restored)
		if err != nil {
			t.Fatal(err)
		}
		if count != maxN {
			t.Fatalf("copy %d: %d rows but highest is %d: not a prefix", i, count, maxN)
		}
		if maxN < before || maxN > after {
			t.Fatalf("copy %d: holds rows 1..%d, but %d were committed before the copy and %d after", i, maxN, before, after)
		}
		t.Logf("copy %d: rows 1..%d (committed before %d, after %d)", i, maxN, before, after)
		prev = after
	}
	last, err := w.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if last <= prev {
		t.Fatalf("writer stopped at %d, no progress after the last copy (%d)", last, prev)
	}
	// The live store itself is intact and ReadConsistent left nothing behind.
	if err := Check(t.Context(), path); err != nil {
		t.Fatal(err)
	}
	for _, n := range dirNames(t, filepath.Dir(path)) {
		if strings.Contains(n, ".copy-") {
			t.Fatalf("temp file %s left behind", n)
		}
	}
}

// TestReadConsistentDeterministic: an unchanged store gives byte-identical copies (so "unchanged" detection by
// sha256 works), whether its latest pages sit in the WAL or were checkpointed into the file; any commit changes it.
func TestReadConsistentDeterministic(t *testing.T) {
	t.Parallel()
	path := newStore(t, 2<<20)
	ctx := t.Context()
	read := func() [32]byte {
		t.Helper()
		data, err := ReadConsistent(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(data)
	}

	idle1, idle2 := read(), read()
	if idle1 != idle2 {
		t.Fatal("two copies of an idle store differ")
	}
	fileSum := func() [32]byte {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(b)
	}

	live := openLive(t, path)
	if live1 := read(); live1 != idle1 {
		t.Fatal("a gateway connection opening the store changed the copy")
	}
	if _, err := live.ExecContext(ctx, "UPDATE whatsmeow_device SET push_name = 'changed'"); err != nil {
		t.Fatal(err)
	}
	changed1 := read()
	if changed1 == idle1 {
		t.Fatal("a committed change did not change the copy")
	}
	if changed2 := read(); changed2 != changed1 {
		t.Fatal("two copies of the changed (WAL-resident) store differ")
	}
	fileBefore := fileSum()
	if _, err := live.ExecContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		t.Fatal(err)
	}
	if fileSum() == fileBefore {
		t.Fatal("checkpoint did not move the change into the file; the test proves nothing")
	}
	if after := read(); after != changed1 {
		t.Fatal("the copy changed when the WAL was checkpointed, though the content did not")
	}
	// Reading never changes the source.
	fileBefore = fileSum()
	read()
	if fileSum() != fileBefore {
		t.Fatal("ReadConsistent modified the source file")
	}
}

func TestReadConsistentMissingFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "session.db")
	data, err := ReadConsistent(t.Context(), path)
	if err == nil || data != nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadConsistent of a missing file = %d bytes, %v", len(data), err)
	}
	if names := dirNames(t, dir); len(names) != 0 {
		t.Fatalf("ReadConsistent of a missing file left %v", names)
	}
}

func TestReadConsistentCancelled(t *testing.T) {
	t.Parallel()
	path := newStore(t, 0)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := ReadConsistent(ctx, path); !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

// corruptPages overwrites the middle of the file with garbage, keeping the header, as a torn disk write would.
func corruptPages(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(b) / 2; i < len(b)/2+8192 && i < len(b); i++ {
		b[i] = byte(i * 31)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCheckAndHasDevice(t *testing.T) {
	t.Parallel()
	type want struct {
		checkOK   bool
		hasDevice bool
		deviceErr bool
	}
	for _, tc := range []struct {
		name string
		make func(t *testing.T, path string)
		want want
	}{
		{"linked store", func(t *testing.T, p string) {
			if err := wastore.Create(t.Context(), p, 1<<20); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: true, hasDevice: true}},
		{"unpaired store", func(t *testing.T, p string) {
			if err := wastore.CreateUnpaired(t.Context(), p); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: true, hasDevice: false}},
		{"empty file", func(t *testing.T, p string) {
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: true, hasDevice: false}},
		{"other SQLite database", func(t *testing.T, p string) {
			db, err := sql.Open("sqlite", "file:"+p)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if _, err := db.Exec("CREATE TABLE notes (x TEXT); INSERT INTO notes VALUES ('hi')"); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: true, hasDevice: false}},
		{"device row deleted (logged out)", func(t *testing.T, p string) {
			if err := wastore.Create(t.Context(), p, 0); err != nil {
				t.Fatal(err)
			}
			db, err := sql.Open("sqlite", wastore.DSN(p))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if _, err := db.Exec("DELETE FROM whatsmeow_device"); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: true, hasDevice: false}},
		{"garbage", func(t *testing.T, p string) {
			if err := os.WriteFile(p, bytes.Repeat([]byte("not a database "), 1000), 0o600); err != nil {
				t.Fatal(err)
			}
		}, want{checkOK: false, deviceErr: true}},
		{"linked store with corrupt pages", func(t *testing.T, p string) {
			if err := wastore.Create(t.Context(), p, 1<<20); err != nil {
				t.Fatal(err)
			}
			corruptPages(t, p)
		}, want{checkOK: false, hasDevice: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "session.db")
			tc.make(t, path)
			err := Check(t.Context(), path)
			if (err == nil) != tc.want.checkOK {
				t.Fatalf("Check = %v, want ok=%v", err, tc.want.checkOK)
			}
			has, err := HasDevice(t.Context(), path)
			if (err != nil) != tc.want.deviceErr {
				t.Fatalf("HasDevice error %v, want error=%v", err, tc.want.deviceErr)
			}
			if has != tc.want.hasDevice {
				t.Fatalf("HasDevice = %v, want %v", has, tc.want.hasDevice)
			}
		})
	}
}

func TestCheckMissingFileCreatesNothing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := filepath.Join(dir, "session.db")
	if err := Check(t.Context(), p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Check of a missing file: %v", err)
	}
	if _, err := HasDevice(t.Context(), p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("HasDevice of a missing file: %v", err)
	}
	if names := dirNames(t, dir); len(names) != 0 {
		t.Fatalf("left %v", names)
	}
}

func TestVerify(t *testing.T) {
	t.Parallel()
	linked, err := ReadConsistent(t.Context(), newStore(t, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	unpairedPath := filepath.Join(t.TempDir(), "session.db")
	if err := wastore.CreateUnpaired(t.Context(), unpairedPath); err != nil {
		t.Fatal(err)
	}
	unpaired, err := ReadConsistent(t.Context(), unpairedPath)
	if err != nil {
		t.Fatal(err)
	}
	corrupt := bytes.Clone(linked)
	for i := len(corrupt) / 2; i < len(corrupt)/2+8192; i++ {
		corrupt[i] = byte(i * 31)
	}
	for _, tc := range []struct {
		name    string
		plain   []byte
		has     bool
		wantErr bool
	}{
		{"linked", linked, true, false},
		{"unpaired", unpaired, false, false},
		{"corrupt", corrupt, false, true},
		{"garbage", []byte("hello, not a database at all, just some bytes that are long enough"), false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			has, err := Verify(t.Context(), tc.plain, dir)
			if (err != nil) != tc.wantErr || has != tc.has {
				t.Fatalf("Verify = %v, %v; want %v, error=%v", has, err, tc.has, tc.wantErr)
			}
			if names := dirNames(t, dir); len(names) != 0 {
				t.Fatalf("Verify left %v in its temp dir", names)
			}
		})
	}
}

func TestWriteFileAtomic(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "session.db")
	if err := os.WriteFile(path, bytes.Repeat([]byte("old"), 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, side := range []string{"-wal", "-shm", "-journal"} {
		if err := os.WriteFile(path+side, []byte("stale"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "other.db-wal"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	data := []byte("new, and shorter")
	if err := WriteFileAtomic(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("target holds %q, %v", got, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
	names := dirNames(t, dir)
	slices.Sort(names)
	if want := []string{"other.db-wal", "session.db"}; !slices.Equal(names, want) {
		t.Fatalf("directory holds %v, want %v (stale side files removed, no temp file, others kept)", names, want)
	}
}

func TestWriteFileAtomicMissingDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := WriteFileAtomic(filepath.Join(dir, "nope", "session.db"), []byte("x"), 0o600); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	if names := dirNames(t, dir); len(names) != 0 {
		t.Fatalf("left %v", names)
	}
}

// TestRestoreOverStaleWAL is the case WriteFileAtomic's side-file removal exists for: the previous session.db
// crashed with committed frames still in its WAL. Restoring a snapshot over it must give the snapshot's content,
// intact, not the old WAL replayed onto new pages.
func TestRestoreOverStaleWAL(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// The snapshot to restore: a store with 0 writer rows.
	snap, err := ReadConsistent(ctx, newStore(t, 1<<20))
	if err != nil {
		t.Fatal(err)
	}

	// The crashed store: another linked store with writes sitting in its WAL, files copied while it is open.
	oldPath := newStore(t, 1<<20)
	live := openLive(t, oldPath)
	w, err := wastore.StartWriter(ctx, oldPath)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "200 committed writes", func() bool { return w.Last() >= 200 })
	if _, err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	target := filepath.Join(dir, "session.db")
	for _, side := range []string{"", "-wal", "-shm"} {
		b, err := os.ReadFile(oldPath + side)
		if err != nil {
			t.Fatal(err)
		}
		if side == "-wal" && len(b) < 100<<10 {
			t.Fatalf("old WAL holds only %d bytes; the test needs frames in it", len(b))
		}
		if err := os.WriteFile(target+side, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_ = live.Close()

	if err := WriteFileAtomic(target, snap, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Check(ctx, target); err != nil {
		t.Fatalf("restored store: %v", err)
	}
	// The snapshot had no writer table: if it exists now, the old WAL was replayed.
	db, err := sql.Open("sqlite", wastore.DSN(target))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_schema WHERE name = 'wastore_writes'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatal("the old store's WAL was replayed onto the restored snapshot")
	}
	restored, err := ReadConsistent(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(restored) != sha256.Sum256(snap) {
		t.Fatal("a copy of the restored store differs from the snapshot")
	}
}

// TestScratchFilesOfDeadProcessesAreRemoved: copies and verify files left by a killed process are cleaned up by
// the next call once old; fresh ones (maybe another call's, running now) are left alone.
func TestScratchFilesOfDeadProcessesAreRemoved(t *testing.T) {
	t.Parallel()
	path := newStore(t, 0)
	dir := filepath.Dir(path)
	old := time.Now().Add(-time.Hour)
	mk := func(name string, stale bool) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("leftover"), 0o600); err != nil {
			t.Fatal(err)
		}
		if stale {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk(".session.db.copy-111", true)
	mk(".session.db.copy-111-journal", true)
	mk(".session.db.copy-222", false)
	mk(".verify-333.db", true)
	mk(".verify-444.db", false)
	mk(".other.db.copy-555", true)

	if _, err := ReadConsistent(t.Context(), path); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(t.Context(), []byte("garbage that is not a database"), dir); err == nil {
		t.Fatal("Verify accepted garbage")
	}
	names := dirNames(t, dir)
	slices.Sort(names)
	want := []string{".other.db.copy-555", ".session.db.copy-222", ".verify-444.db", "session.db", "session.db-shm", "session.db-wal"}
	// The source's -wal/-shm exist only while something has it open; ignore them.
	names = slices.DeleteFunc(names, func(n string) bool { return strings.HasPrefix(n, "session.db-") })
	want = slices.DeleteFunc(want, func(n string) bool { return strings.HasPrefix(n, "session.db-") })
	if !slices.Equal(names, want) {
		t.Fatalf("directory holds %v, want %v", names, want)
	}
}

// TestOddPaths: DATA_DIR is user input; spaces, URI metacharacters and relative paths must reach SQLite intact.
func TestOddPaths(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	for _, rel := range []string{
		"session.db",
		"./data/session.db",
		"with space/session.db",
		"q?mark#hash%25pct&amp=1/session.db",
	} {
		t.Run(rel, func(t *testing.T) {
			if err := os.MkdirAll(filepath.Dir(rel), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := wastore.Create(t.Context(), filepath.Join(dir, rel), 0); err != nil {
				t.Fatal(err)
			}
			data, err := ReadConsistent(t.Context(), rel)
			if err != nil {
				t.Fatal(err)
			}
			if err := Check(t.Context(), rel); err != nil {
				t.Fatal(err)
			}
			if has, err := HasDevice(t.Context(), rel); err != nil || !has {
				t.Fatalf("HasDevice = %v, %v", has, err)
			}
			if has, err := Verify(t.Context(), data, filepath.Dir(rel)); err != nil || !has {
				t.Fatalf("Verify = %v, %v", has, err)
			}
			// Nothing was created under a mangled name.
			for _, n := range dirNames(t, filepath.Dir(filepath.Join(dir, rel))) {
				if n != "session.db" && !strings.HasPrefix(n, "session.db-") && n != "data" && n != "with space" && !strings.HasPrefix(n, "q?") {
					t.Errorf("unexpected file %q", n)
				}
			}
		})
	}
}
