package wastore_test

import (
	"database/sql"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.mau.fi/whatsmeow/store/sqlstore"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/internal/wastore"
)

func TestCreateSizes(t *testing.T) {
	t.Parallel()
	for _, size := range []int64{0, 1 << 20, 5 << 20} {
		path := filepath.Join(t.TempDir(), "session.db")
		start := time.Now()
		if err := wastore.Create(t.Context(), path, size); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("target %d: file %d bytes in %s", size, fi.Size(), time.Since(start))
		if fi.Size() < size || fi.Size() > size+size/20+256<<10 {
			t.Errorf("target %d: file is %d bytes", size, fi.Size())
		}
		// whatsmeow itself must find the linked device.
		c, err := sqlstore.New(t.Context(), "sqlite", wastore.DSN(path), nil)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := c.GetFirstDevice(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if dev.ID == nil || *dev.ID != wastore.DeviceJID {
			t.Errorf("device %v, want %v", dev.ID, wastore.DeviceJID)
		}
		n, err := dev.PreKeys.UploadedPreKeyCount(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if size > 0 && n == 0 {
			t.Errorf("target %d: no uploaded pre-keys", size)
		}
		contacts, err := dev.Contacts.GetAllContacts(t.Context())
		if err != nil {
			t.Fatalf("whatsmeow cannot read the generated contacts: %v", err)
		}
		if size > 0 && len(contacts) == 0 {
			t.Errorf("target %d: no contacts", size)
		}
		if size >= 1<<20 {
			// Every Signal table whatsmeow keeps for a busy account has rows.
			db, err := sql.Open("sqlite", wastore.DSN(path))
			if err != nil {
				t.Fatal(err)
			}
			for _, table := range []string{"whatsmeow_sessions", "whatsmeow_identity_keys", "whatsmeow_pre_keys",
				"whatsmeow_sender_keys", "whatsmeow_message_secrets", "whatsmeow_app_state_mutation_macs",
				"whatsmeow_app_state_version", "whatsmeow_app_state_sync_keys", "whatsmeow_contacts",
				"whatsmeow_lid_map", "whatsmeow_privacy_tokens"} {
				var n int
				if err := db.QueryRowContext(t.Context(), "SELECT count(*) FROM "+table).Scan(&n); err != nil || n == 0 {
					t.Errorf("target %d: %s has %d rows (%v)", size, table, n, err)
				}
			}
			_ = db.Close()
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCreateUnpaired(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "session.db")
	if err := wastore.CreateUnpaired(t.Context(), path); err != nil {
		t.Fatal(err)
	}
	c, err := sqlstore.New(t.Context(), "sqlite", wastore.DSN(path), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	devs, err := c.GetAllDevices(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 0 {
		t.Fatalf("unpaired store has %d devices", len(devs))
	}
}

func TestCreateRefusesExisting(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "session.db")
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := wastore.Create(t.Context(), path, 0); err == nil {
		t.Fatal("Create overwrote an existing file")
	}
}

func TestWriterCommitsNumberedRows(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "session.db")
	if err := wastore.Create(t.Context(), path, 512<<10); err != nil {
		t.Fatal(err)
	}
	w, err := wastore.StartWriter(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "100 committed writes", func() bool { return w.Last() >= 100 })
	last, err := w.Stop()
	if err != nil {
		t.Fatal(err)
	}
	count, maxN, err := wastore.Writes(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	if count != last || maxN != last {
		t.Fatalf("writer says %d, store has count %d max %d", last, count, maxN)
	}
	// A second writer continues the numbering.
	w2, err := wastore.StartWriter(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "10 more writes from the restarted writer", func() bool { return w2.Last() >= last+10 })
	last2, err := w2.Stop()
	if err != nil {
		t.Fatal(err)
	}
	count, maxN, err = wastore.Writes(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	if count != last2 || maxN != last2 {
		t.Fatalf("after restart: writer says %d, store has count %d max %d", last2, count, maxN)
	}
}
