package gateway

import (
	"fmt"
	"testing"
)

// BenchmarkMessageHandOver is the time the gateway adds before WhatsApp's
// receipt: one incoming message converted, sent to relay on P.relay.store
// over the in-process bus, and relay's ok awaited (the stand-in relay stores
// in memory, so this is the gateway's and the bus's share, not relay's
// commit).
func BenchmarkMessageHandOver(b *testing.B) {
	h := start(b)
	h.connected()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		if !h.conn.emit(textMsg(fmt.Sprintf("bench-%d", i), "15557770000", "hello")) {
			b.Fatal("not acknowledged")
		}
	}
}
