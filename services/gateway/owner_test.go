package gateway

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.mau.fi/whatsmeow/proto/waE2E"
	"go.mau.fi/whatsmeow/types"
	"go.mau.fi/whatsmeow/types/events"
	"google.golang.org/protobuf/proto"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

func TestContent(t *testing.T) {
	tests := []struct {
		name     string
		msg      *waE2E.Message
		typ, txt string
	}{
		{"nil", nil, "unknown", ""},
		{"conversation", textProto("hi"), "text", "hi"},
		{"extended text", &waE2E.Message{ExtendedTextMessage: &waE2E.ExtendedTextMessage{Text: proto.String("link")}}, "text", "link"},
		{"image caption", &waE2E.Message{ImageMessage: &waE2E.ImageMessage{Caption: proto.String("cat")}}, "image", "cat"},
		{"audio", &waE2E.Message{AudioMessage: &waE2E.AudioMessage{}}, "audio", ""},
		{"reaction", &waE2E.Message{ReactionMessage: &waE2E.ReactionMessage{Text: proto.String("👍")}}, "reaction", "👍"},
		{"poll", &waE2E.Message{PollCreationMessageV3: &waE2E.PollCreationMessage{Name: proto.String("lunch?")}}, "poll", "lunch?"},
		{"other", &waE2E.Message{}, "other", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typ, txt := content(tt.msg)
			if typ != tt.typ || txt != tt.txt {
				t.Fatalf("content = %q %q, want %q %q", typ, txt, tt.typ, tt.txt)
			}
		})
	}
}

func TestParseCommand(t *testing.T) {
	tests := []struct {
		text, prefix, want string
	}{
		{".ping", ".", CmdPing},
		{"  .STATUS now", ".", CmdStatus},
		{"!backup", "!", CmdBackup},
		{"ping", ".", ""},
		{". ping", ".", CmdPing},
		{".", ".", ""},
		{".help", ".", ""},
		{"#ping", ".", ""},
	}
	for _, tt := range tests {
		got, ok := ParseCommand(tt.text, tt.prefix)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("ParseCommand(%q, %q) = %q %v, want %q", tt.text, tt.prefix, got, ok, tt.want)
		}
	}
}

const owner = "15550001111"

// ownerMsg is a message from the owner; sender may be a LID with the phone
// number as SenderAlt, as whatsmeow delivers it for LID chats.
func ownerMsg(id, text string, viaLID bool) *events.Message {
	e := textMsg(id, owner, text)
	if viaLID {
		lid := types.NewJID("88442211", types.HiddenUserServer)
		e.Info.SenderAlt = e.Info.Sender
		e.Info.Sender, e.Info.Chat = lid, lid
	}
	return e
}

// replies waits for n sent messages and returns them.
func (h *harness) replies(n int) []sentMsg {
	h.t.Helper()
	testwait.For(h.t, 5*time.Second, "owner replies", func() bool { return len(h.conn.sentMsgs()) >= n })
	return h.conn.sentMsgs()
}

func TestOwnerCommands(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = false })
	h.connected()
	h.advance(90 * time.Second)

	// Not the owner: ignored (the owner's ping that follows gets the only reply).
	h.conn.emit(textMsg("m1", "15557770000", ".ping"))
	h.conn.emit(ownerMsg("m2", ".ping", false))
	got := h.replies(1)
	if len(got) != 1 || !strings.HasPrefix(got[0].Text, "pong") || !strings.Contains(got[0].Text, "1m30s") ||
		got[0].To.User != owner {
		t.Fatalf("replies = %+v", got)
	}

	// Through a LID sender with the phone number as SenderAlt; the reply
	// goes to the chat it came from.
	h.conn.emit(ownerMsg("m3", ".status", true))
	got = h.replies(2)
	st := got[1]
	if st.To.Server != types.HiddenUserServer || !strings.Contains(st.Text, "state: connected") ||
		!strings.Contains(st.Text, "uptime: 1m30s") || !strings.Contains(st.Text, "backup: disabled") {
		t.Fatalf("status reply = %+v", st)
	}

	h.conn.emit(ownerMsg("m4", ".backup", false))
	if got := h.replies(3); !strings.Contains(got[2].Text, "backup is disabled") {
		t.Fatalf("backup reply = %q", got[2].Text)
	}
}

func TestOwnerBackupAndStatus(t *testing.T) {
	h := start(t, func(c *Config, _ *fakeConn) { c.BackupEnabled = true })
	h.serveRestore(func(m *nats.Msg) {
		_ = bus.Respond(m, bus.RestoreReply{Instance: testUnit, OK: true, Source: bus.SourceExisting})
	})
	h.advanceUntilOpen(t)
	h.connected()

	// No backup service: said plainly.
	h.conn.emit(ownerMsg("b1", ".backup", false))
	if got := h.replies(1); !strings.Contains(got[0].Text, "not answering") {
		t.Fatalf("backup without responder = %q", got[0].Text)
	}

	// A backup service answers with the committed snapshot.
	bsub, err := h.nc.Subscribe(h.subj.BackupRequest(), func(m *nats.Msg) {
		r, err := bus.DecodeBackupRequest(m.Data)
		if err != nil || r.Reason != bus.ReasonManual {
			t.Errorf("backup request %q: %v", m.Data, err)
		}
		_ = bus.Respond(m, bus.BackupReply{OK: true, JobID: 4, Snapshot: &bus.SnapshotRef{ID: 7, Bytes: 1234, SHA256: "ab"}})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer bsub.Unsubscribe()
	if err := h.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	h.conn.emit(ownerMsg("b2", ".backup", false))
	if got := h.replies(2); !strings.Contains(got[1].Text, "snapshot #7") {
		t.Fatalf("backup reply = %q", got[1].Text)
	}

	// status names the last snapshot seen on backup.done.
	h.conn.emit(ownerMsg("s1", ".status", false))
	if got := h.replies(3); !strings.Contains(got[2].Text, "last snapshot: none seen") {
		t.Fatalf("status before backup.done = %q", got[2].Text)
	}
	done := bus.BackupDone{SnapshotID: 7, Reason: bus.ReasonManual, Bytes: 1234}
	done.Stamp("Test-Bot", h.clock.Now())
	if err := bus.Publish(h.nc, h.subj.BackupDone(), done); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 5*time.Second, "backup.done to be seen", func() bool {
		return strings.Contains(h.gw.statusText(), "#7")
	})
	h.conn.emit(ownerMsg("s2", ".status", false))
	if got := h.replies(4); !strings.Contains(got[3].Text, "last snapshot: #7 (manual)") {
		t.Fatalf("status after backup.done = %q", got[3].Text)
	}
}

func TestOwnerAlertAfterLongOffline(t *testing.T) {
	tests := []struct {
		name    string
		offline time.Duration
		alert   bool
	}{
		{"short outage: no alert", 4 * time.Minute, false},
		{"over five minutes: alert", 6 * time.Minute, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t)
			h.connected()
			h.conn.emit(&events.Disconnected{})
			h.rec.next(t, bus.ConnDisconnected)
			h.rec.next(t, bus.ConnReconnecting)
			h.advance(tt.offline)
			h.rec.next(t, bus.ConnConnecting)
			h.conn.emit(&events.Connected{})
			h.rec.next(t, bus.ConnConnected)
			// A ping after the reconnect: its pong is the first reply unless
			// an alert came before it.
			h.conn.emit(ownerMsg("p", ".ping", false))
			got := h.replies(1)
			if !tt.alert {
				if !strings.HasPrefix(got[0].Text, "pong") {
					t.Fatalf("unexpected first message %q", got[0].Text)
				}
				return
			}
			if !strings.Contains(got[0].Text, "Back online after 6m0s") || got[0].To != types.NewJID(owner, types.DefaultUserServer) {
				t.Fatalf("alert = %+v", got[0])
			}
		})
	}
}

func TestBackupNowAnswers(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	nc, err := srv.Connect("gw", discard())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	g := New(Config{Session: "S", BackupEnabled: true, BackupTimeout: 100 * time.Millisecond}, Deps{NC: nc, Log: discard()})

	tests := []struct {
		name  string
		reply any // nil: subscribe but never answer
		want  string
	}{
		{"refused", bus.BackupReply{OK: false, Error: "database unreachable"}, "backup failed: database unreachable"},
		{"unchanged", bus.BackupReply{OK: true, Snapshot: &bus.SnapshotRef{ID: 3, Bytes: 10, Unchanged: true}}, "snapshot #3, unchanged"},
		{"no snapshot ref", bus.BackupReply{OK: true, JobID: 12}, "backup done (job 12)"},
		{"garbled reply", "not json object", "backup request failed"},
		{"silent service", nil, "no reply within 100ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sub, err := nc.Subscribe(g.subj.BackupRequest(), func(m *nats.Msg) {
				if tt.reply != nil {
					_ = bus.Respond(m, tt.reply)
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Unsubscribe()
			if got := g.backupNow(t.Context()); !strings.Contains(got, tt.want) {
				t.Fatalf("answer = %q, want it to contain %q", got, tt.want)
			}
		})
	}
}
