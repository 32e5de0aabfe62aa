package relay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// replayRaw asks P.msg.replay and returns the raw reply, failing the test
// when nobody answers within a few seconds (an answer over the payload
// limit is never sent, so the bot only sees a timeout).
func replayRaw(t *testing.T, s *setup, req bus.MsgReplayRequest) []byte {
	t.Helper()
	data, _ := json.Marshal(req)
	m, err := s.bus.nc.Request(subj.MsgReplay(), data, 5*time.Second)
	if err != nil {
		t.Fatalf("replay after %d: %v", req.AfterSeq, err)
	}
	return m.Data
}

// JSON escapes '<' as \u003c: twenty messages of 20,000 of them are 2.4 MB
// of JSON although their text is 400 KB. Replay answers pages under the
// limit, and paging after the last seq gets every message.
func TestReplayOfEscapeHeavyMessagesAnswersUnderThePayloadLimit(t *testing.T) {
	s := newSetup(t, "sqlite")
	in := s.start(t)
	text := strings.Repeat("<", 20000)
	for i := range 20 {
		store(t, s.bus.nc, message("c", fmt.Sprintf("E%d", i), text))
	}
	limit := int(in.nc.MaxPayload()) * 3 / 4
	var after int64
	var got []bus.MsgIn
	for pages := 0; len(got) < 20; pages++ {
		if pages > 20 {
			t.Fatalf("no progress: %d messages after %d pages", len(got), pages)
		}
		data := replayRaw(t, s, bus.MsgReplayRequest{AfterSeq: after, Limit: 100})
		if len(data) > limit {
			t.Fatalf("a reply of %d bytes, over 3/4 of the payload limit (%d)", len(data), limit)
		}
		var rep bus.MsgReplayReply
		if err := json.Unmarshal(data, &rep); err != nil || !rep.OK || len(rep.Messages) == 0 {
			t.Fatalf("replay after %d: %v %.200s", after, err, data)
		}
		for _, m := range rep.Messages {
			if m.Seq != after+1 || m.Text != text {
				t.Fatalf("seq %d after %d (text %d bytes)", m.Seq, after, len(m.Text))
			}
			after = m.Seq
			got = append(got, m)
		}
	}
}

// The bound is the reply's real JSON, whatever the text escapes to:
// HTML characters, control characters, line separators, invalid UTF-8.
func TestReplayNeverPassesItsByteBoundWhateverTheTextEscapesTo(t *testing.T) {
	s := newSetup(t, "sqlite")
	in := s.start(t)
	texts := []string{
		strings.Repeat("<>&", 700),
		strings.Repeat("\x01\x02\x1f", 700),
		strings.Repeat("\u2028\u2029", 500),
		strings.Repeat("\"\\", 1000),
		strings.Repeat("é", 1000),
		strings.Repeat("\xff", 1000),
	}
	for i := range 30 {
		m := message("c", fmt.Sprintf("X%d", i), texts[i%len(texts)])
		m.PushName = texts[(i+1)%len(texts)][:60]
		store(t, s.bus.nc, m)
	}
	for _, bound := range []int{20_000, 33_333, 50_000, 100_000} {
		var after int64
		for after < 30 {
			msgs, err := in.svc.Replay(context.Background(), after, 100, bound)
			if err != nil {
				t.Fatalf("bound %d after %d: %v", bound, after, err)
			}
			data, _ := json.Marshal(bus.MsgReplayReply{OK: true, Messages: msgs})
			if len(data) > bound {
				t.Fatalf("bound %d after %d: the reply is %d bytes", bound, after, len(data))
			}
			if len(msgs) == 0 || msgs[0].Seq != after+1 {
				t.Fatalf("bound %d after %d: no progress", bound, after)
			}
			after = msgs[len(msgs)-1].Seq
		}
	}
}

// A message whose JSON alone passes the bound cannot be replayed: the bot
// hears why and how to go past it, at once, not a timeout.
func TestReplayOfAMessageTooLargeAloneIsRefusedWithTheReason(t *testing.T) {
	s := newSetup(t, "sqlite")
	s.bus = newBus(t, bus.ServerOptions{Token: "bots-token-for-relay-tests", MaxPayload: 64 << 10})
	s.start(t)
	store(t, s.bus.nc, message("c", "small", "hi"))
	store(t, s.bus.nc, message("c", "big", strings.Repeat("<", 9000))) // 54 KB of JSON, over 3/4 of 64 KB
	store(t, s.bus.nc, message("c", "after", "bye"))

	var rep bus.MsgReplayReply
	if err := json.Unmarshal(replayRaw(t, s, bus.MsgReplayRequest{}), &rep); err != nil || !rep.OK ||
		len(rep.Messages) != 1 || rep.Messages[0].Seq != 1 {
		t.Fatalf("first page: ok %v, %d messages, %v, want seq 1 alone", rep.OK, len(rep.Messages), err)
	}
	rep = bus.MsgReplayReply{}
	if err := json.Unmarshal(replayRaw(t, s, bus.MsgReplayRequest{AfterSeq: 1}), &rep); err != nil || rep.OK ||
		!strings.Contains(rep.Error, "seq 2") || !strings.Contains(rep.Error, "after_seq 2") || rep.Messages == nil {
		t.Fatalf("the big one: ok %v, %d messages, %q, %v, want ok:false naming seq 2 and how to skip it", rep.OK, len(rep.Messages), rep.Error, err)
	}
	rep = bus.MsgReplayReply{}
	if err := json.Unmarshal(replayRaw(t, s, bus.MsgReplayRequest{AfterSeq: 2}), &rep); err != nil || !rep.OK ||
		len(rep.Messages) != 1 || rep.Messages[0].Seq != 3 {
		t.Fatalf("past it: ok %v, %d messages, %q, %v", rep.OK, len(rep.Messages), rep.Error, err)
	}
}
