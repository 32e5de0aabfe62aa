// Package testrelay is a stand-in for the relay service in tests of the
// gateway and of what runs over it: it answers P.relay.store as relay does
// (ok once "stored", Duplicate for a message it already has under the same
// chat and id), publishes what it stored on P.msg.in (with seq) and
// P.msg.receipt, and can forward the bots' P.msg.send to the gateway's
// P.gateway.send (relay's waiting send, without its queue). Modes make it
// refuse, stay silent or go away, for the gateway's failure paths; Off and
// On take it away and bring it back as a restarted relay does, heartbeat
// included.
package testrelay

import (
	"bytes"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/blacksky-md/blacksky/shared/bus"
)

// Mode is how the stand-in answers P.relay.store.
type Mode int

const (
	// Store answers ok after recording the item (the default).
	Store Mode = iota
	// Refuse answers ok:false, as relay does when its commit fails.
	Refuse
	// Silent never answers: the gateway's request times out.
	Silent
)

// RefuseError is the error a Refuse answer carries.
const RefuseError = "test relay: database unavailable"

// Relay is one running stand-in.
type Relay struct {
	nc      *nats.Conn
	session string
	subj    bus.Subjects

	mu       sync.Mutex
	mode     Mode
	subs     []*nats.Subscription
	seq      int64
	seqOf    map[string]int64 // chat + "\x00" + id
	messages []bus.MsgIn      // first stores, in seq order
	receipts []bus.Receipt
	requests int // every P.relay.store request, answered or not
	forward  bool
	stopped  bool

	forwards sync.WaitGroup
}

// Option adjusts Start.
type Option func(*Relay)

// ForwardSends makes the stand-in answer P.msg.send by asking
// P.gateway.send and relaying the answer, as relay does for a send that
// waits.
func ForwardSends() Option {
	return func(r *Relay) { r.forward = true }
}

// Start subscribes on nc for session until the test ends.
func Start(tb testing.TB, nc *nats.Conn, session string, opts ...Option) *Relay {
	tb.Helper()
	r := &Relay{nc: nc, session: session, subj: bus.NewSubjects(session), seqOf: map[string]int64{}}
	for _, o := range opts {
		o(r)
	}
	r.subscribeAll()
	if err := nc.Flush(); err != nil {
		tb.Fatalf("testrelay: %v", err)
	}
	tb.Cleanup(r.Stop)
	return r
}

func (r *Relay) subscribeAll() {
	r.subscribe(r.subj.RelayStore(), r.onStore)
	if r.forward {
		r.subscribe(r.subj.MsgSend(), r.forwardSend)
	}
}

func (r *Relay) subscribe(subject string, h nats.MsgHandler) {
	sub, err := r.nc.Subscribe(subject, h)
	if err != nil {
		panic("testrelay: subscribe " + subject + ": " + err.Error())
	}
	r.mu.Lock()
	r.subs = append(r.subs, sub)
	r.mu.Unlock()
}

// Stop unsubscribes (the gateway then meets no responders) and waits for
// forwarded sends in flight, for good. Safe to call twice.
func (r *Relay) Stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.Off()
}

// Off takes the stand-in away as a relay that stopped: no responder on its
// subjects, no heartbeat. What it stored is kept for On.
func (r *Relay) Off() {
	r.mu.Lock()
	subs := r.subs
	r.subs = nil
	r.mu.Unlock()
	for _, s := range subs {
		_ = s.Unsubscribe()
	}
	_ = r.nc.Flush()
	r.forwards.Wait()
}

// On brings it back after Off, as a restarted relay over the same
// database: it answers again, remembering what it stored, and publishes
// its first heartbeat (database_ok). It errs after Stop.
func (r *Relay) On() error {
	r.mu.Lock()
	stopped, on := r.stopped, len(r.subs) > 0
	r.mu.Unlock()
	if stopped {
		return errors.New("testrelay: On after Stop")
	}
	if !on {
		r.subscribeAll()
	}
	if err := r.nc.Flush(); err != nil {
		return err
	}
	return r.Beat(true)
}

// Beat publishes one relay heartbeat (P.heartbeat.relay) whose details say
// whether the database answers, as relay's own heartbeat does.
func (r *Relay) Beat(databaseOK bool) error {
	d, err := json.Marshal(bus.RelayDetails{Database: "postgres", DatabaseOK: databaseOK})
	if err != nil {
		return err
	}
	state := bus.StateOK
	if !databaseOK {
		state = bus.StateDegraded
	}
	hb := bus.Heartbeat{Service: bus.ServiceRelay, Instance: "testrelay", State: state, Details: d}
	hb.Stamp(r.session, time.Now()) // the gateway reads only database_ok
	if err := bus.Publish(r.nc, r.subj.Heartbeat(bus.ServiceRelay), hb); err != nil {
		return err
	}
	return r.nc.Flush()
}

// SetMode changes how the following requests are answered.
func (r *Relay) SetMode(m Mode) {
	r.mu.Lock()
	r.mode = m
	r.mu.Unlock()
}

// Messages are the messages stored, each once, in seq order.
func (r *Relay) Messages() []bus.MsgIn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bus.MsgIn(nil), r.messages...)
}

// Receipts are the receipts stored.
func (r *Relay) Receipts() []bus.Receipt {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bus.Receipt(nil), r.receipts...)
}

// Requests counts P.relay.store requests received, answered or not.
func (r *Relay) Requests() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests
}

func (r *Relay) onStore(m *nats.Msg) {
	var req bus.RelayStoreRequest
	dec := json.NewDecoder(bytes.NewReader(m.Data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	if err == nil && (req.Message == nil) == (req.Receipt == nil) {
		err = errors.New("want exactly one of message and receipt")
	}
	r.mu.Lock()
	r.requests++
	mode := r.mode
	if err != nil || mode != Store {
		r.mu.Unlock()
		switch {
		case err != nil:
			_ = bus.Respond(m, bus.RelayStoreReply{Error: "test relay: " + err.Error()})
		case mode == Refuse:
			_ = bus.Respond(m, bus.RelayStoreReply{Error: RefuseError})
		}
		return
	}
	var reply bus.RelayStoreReply
	var publish func()
	switch {
	case req.Message != nil:
		in := *req.Message
		key := in.Chat + "\x00" + in.ID
		if seq, ok := r.seqOf[key]; ok {
			reply = bus.RelayStoreReply{OK: true, Seq: seq, Duplicate: true}
			break
		}
		r.seq++
		in.Seq = r.seq
		r.seqOf[key] = r.seq
		r.messages = append(r.messages, in)
		reply = bus.RelayStoreReply{OK: true, Seq: in.Seq}
		publish = func() { _ = bus.Publish(r.nc, r.subj.MsgIn(), in) }
	default:
		rc := *req.Receipt
		r.receipts = append(r.receipts, rc)
		reply = bus.RelayStoreReply{OK: true}
		publish = func() { _ = bus.Publish(r.nc, r.subj.MsgReceipt(), rc) }
	}
	r.mu.Unlock()
	// Relay's delivery is a job after the commit; publishing before the
	// answer keeps tests that wait on P.msg.in simple.
	if publish != nil {
		publish()
	}
	_ = bus.Respond(m, reply)
}

// forwardSend answers a bot's P.msg.send with the gateway's answer to
// P.gateway.send, off the subscription's goroutine.
func (r *Relay) forwardSend(m *nats.Msg) {
	r.forwards.Go(func() {
		reply, err := r.nc.Request(r.subj.GatewaySend(), m.Data, 30*time.Second)
		if err != nil {
			_ = bus.Respond(m, bus.MsgSendReply{Error: "test relay: gateway.send: " + err.Error()})
			return
		}
		_ = m.Respond(reply.Data)
	})
}
