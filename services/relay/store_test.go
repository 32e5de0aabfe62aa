package relay_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/services/relay"
	"github.com/blacksky-md/blacksky/shared/bus"
)

var subj = bus.NewSubjects(session)

func TestStoredMessageIsPublishedWithItsSeq(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			in := collect(t, s.bus.nc, subj.MsgIn())
			s.start(t)
			gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
			for i := range 3 {
				rep := store(t, gw, message("111@s.whatsapp.net", fmt.Sprintf("ID%d", i), fmt.Sprintf("hello %d", i)))
				if !rep.OK || rep.Seq != int64(i+1) || rep.Duplicate {
					t.Fatalf("store %d: %+v", i, rep)
				}
			}
			testwait.For(t, 20*time.Second, "three msg.in", func() bool { return in.len() >= 3 })
			got := in.msgIns(t)
			for i, m := range got {
				if m.Seq != int64(i+1) || m.ID != fmt.Sprintf("ID%d", i) || m.Text != fmt.Sprintf("hello %d", i) ||
					m.Session != session || m.PushName != "Ann" || m.At.IsZero() {
					t.Fatalf("msg.in %d: %+v (one chat is delivered in seq order)", i, m)
				}
			}
		})
	}
}

func TestRedeliveredMessageIsStoredOnceAndAnsweredDuplicate(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			s.start(t)
			gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
			first := store(t, gw, message("c@s.whatsapp.net", "A", "one"))
			store(t, gw, message("c@s.whatsapp.net", "B", "two"))
			again := store(t, gw, message("c@s.whatsapp.net", "A", "one"))
			if !again.OK || !again.Duplicate || again.Seq != first.Seq {
				t.Fatalf("redelivery answered %+v, want duplicate of seq %d", again, first.Seq)
			}
			var rep bus.MsgReplayReply
			request(t, gw, subj.MsgReplay(), bus.MsgReplayRequest{}, &rep)
			if len(rep.Messages) != 2 {
				t.Fatalf("replay has %d messages, want 2 (the redelivery stored once)", len(rep.Messages))
			}
		})
	}
}

func TestBadStoreRequestIsRefusedWithTheReason(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.start(t)
	gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
	store(t, gw, message("c", "warm-up", "x"))
	for body, want := range map[string]string{
		`not json`: "JSON object",
		`{}`:       "exactly one",
		`{"message":{"id":"","chat":"c","at":"2026-03-01T12:00:00Z"}}`:         `"id"`,
		`{"message":{"id":"x","chat":"c","surprise":1}}`:                       "unknown field",
		`{"receipt":{"chat":"c","ids":[],"type":"read"}}`:                      `"ids"`,
		`{"message":{"id":"x","chat":"c"},"receipt":{"chat":"c","ids":["x"]}}`: "exactly one",
	} {
		var rep bus.RelayStoreReply
		request(t, gw, subj.RelayStore(), []byte(body), &rep)
		if rep.OK || !strings.Contains(rep.Error, want) {
			t.Errorf("%s: %+v, want ok:false naming %s", body, rep, want)
		}
	}
}

func TestReplayReturnsStoredMessagesAfterASeqInOrder(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			s := newSetup(t, kind)
			s.start(t)
			gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
			for i := range 6 {
				store(t, gw, message(fmt.Sprintf("chat%d", i%3), fmt.Sprintf("M%d", i), fmt.Sprint(i)))
			}
			bot := s.bus.conn(t, bus.RoleBot)
			var rep bus.MsgReplayReply
			request(t, bot, subj.MsgReplay(), bus.MsgReplayRequest{AfterSeq: 2, Limit: 3}, &rep)
			if !rep.OK || len(rep.Messages) != 3 {
				t.Fatalf("replay: %+v", rep)
			}
			for i, m := range rep.Messages {
				if m.Seq != int64(i+3) || m.ID != fmt.Sprintf("M%d", i+2) || m.Session != session {
					t.Fatalf("replay[%d] = %+v", i, m)
				}
			}
			var bad bus.MsgReplayReply
			request(t, bot, subj.MsgReplay(), []byte(`{"after_seq":-1}`), &bad)
			if bad.OK || !strings.Contains(bad.Error, "after_seq") || bad.Messages == nil {
				t.Fatalf("bad replay: %+v", bad)
			}
		})
	}
}

func TestPayloadIsEncryptedAtRestWithTheSessionKey(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.cfg.Key = bytes.Repeat([]byte{7}, 32)
	s.start(t)
	gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
	const secretText = "the launch code is 0000 0000 0000"
	store(t, gw, message("c", "A", secretText))
	st, err := s.db.open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	row, err := st.Message(context.Background(), session, 1)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(row.Payload, []byte("launch code")) {
		t.Fatal("the stored payload holds the text in the clear")
	}
	var m bus.MsgIn
	if err := (relay.Codec{Key: s.cfg.Key}).Open(row.Payload, &m); err != nil || m.Text != secretText {
		t.Fatalf("open with the key: %+v %v", m, err)
	}
	if err := (relay.Codec{Key: bytes.Repeat([]byte{8}, 32)}).Open(row.Payload, &m); err == nil {
		t.Fatal("opened under another key")
	}
}

func TestHeartbeatCarriesRelayDetails(t *testing.T) {
	s := newSetup(t, "sqlite")
	beats := collect(t, s.bus.nc, subj.Heartbeat(bus.ServiceRelay))
	s.start(t)
	gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
	store(t, gw, message("c", "A", "x"))
	store(t, gw, message("c", "B", "y"))
	// The first beat comes at start; the next at HeartbeatInterval.
	var d bus.RelayDetails
	testwait.Every(t, 3*bus.HeartbeatInterval, 100*time.Millisecond, "a heartbeat with two messages", func() bool {
		for _, m := range beats.all() {
			var hb bus.Heartbeat
			if json.Unmarshal(m.Data, &hb) != nil || hb.Service != bus.ServiceRelay || hb.State != bus.StateOK {
				continue
			}
			if json.Unmarshal(hb.Details, &d) == nil && d.LastSeq == 2 {
				return true
			}
		}
		return false
	})
	if d.Database != "sqlite" || !d.DatabaseOK || d.Stored != 2 || d.Webhook || d.JetStream {
		t.Fatalf("details: %+v", d)
	}
}

func TestStoreIsRefusedWhileTheDatabaseIsDown(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.open = func(context.Context) (relay.Store, error) { return nil, errors.New("connection refused") }
	in := s.start(t)
	gw := s.bus.nc // the gateway's grant to request relay.store is the gateway's side
	var rep bus.RelayStoreReply
	m := message("c", "A", "x")
	request(t, gw, subj.RelayStore(), bus.RelayStoreRequest{Message: &m}, &rep)
	if rep.OK || !strings.Contains(rep.Error, "not ready") {
		t.Fatalf("store while the database is down: %+v, want ok:false (the gateway then does not acknowledge)", rep)
	}
	in.stop(t)
}

func TestReceiptIsStoredOnceAndPublished(t *testing.T) {
	s := newSetup(t, "postgres")
	got := collect(t, s.bus.nc, subj.MsgReceipt())
	s.start(t)
	rc := bus.Receipt{Chat: "c@s.whatsapp.net", Sender: "c@s.whatsapp.net", IDs: []string{"A", "B"}, Type: "read",
		Timestamp: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	var first, again bus.RelayStoreReply
	request(t, s.bus.nc, subj.RelayStore(), bus.RelayStoreRequest{Receipt: &rc}, &first)
	request(t, s.bus.nc, subj.RelayStore(), bus.RelayStoreRequest{Receipt: &rc}, &again)
	if !first.OK || first.Duplicate || !again.OK || !again.Duplicate {
		t.Fatalf("receipt and its redelivery: %+v %+v", first, again)
	}
	testwait.For(t, 20*time.Second, "P.msg.receipt", func() bool { return got.len() >= 1 })
	var ev bus.Receipt
	if err := json.Unmarshal(got.all()[0].Data, &ev); err != nil || ev.Type != "read" || len(ev.IDs) != 2 || ev.Session != session {
		t.Fatalf("msg.receipt: %+v %v", ev, err)
	}
}
