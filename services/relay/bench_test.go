package relay_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blacksky-md/blacksky/internal/testwait"
	"github.com/blacksky-md/blacksky/shared/bus"
)

// storeOnce is one P.relay.store request as the gateway makes it.
func storeOnce(b *testing.B, s *setup, id string) time.Duration {
	m := message("chat-"+id[len(id)-2:], id, "benchmark message of an ordinary length, about sixty bytes")
	data, _ := json.Marshal(bus.RelayStoreRequest{Message: &m})
	start := time.Now()
	msg, err := s.bus.nc.Request(subj.RelayStore(), data, 30*time.Second)
	d := time.Since(start)
	if err != nil {
		b.Fatal(err)
	}
	var rep bus.RelayStoreReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil || !rep.OK {
		b.Fatalf("store: %s %v", msg.Data, err)
	}
	return d
}

func p99(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[len(ds)*99/100]
}

// benchSetup is relay as it runs in production: River polling each queue
// once a second (tests poll every 50 ms) and its default lanes.
func benchSetup(b *testing.B) *setup {
	s := newSetup(b, "postgres")
	s.pollInterval, s.webhookLanes = -1, -1
	return s
}

// BenchmarkStoreThroughputPostgres is sustained P.relay.store requests per
// second for one session on PostgreSQL, 16 requests in flight (whatsmeow
// hands messages over from several goroutines), each committed with its
// delivery job before the answer.
func BenchmarkStoreThroughputPostgres(b *testing.B) {
	s := benchSetup(b)
	s.start(b)
	var n atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	b.SetParallelism(8)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		for pb.Next() {
			mine = append(mine, storeOnce(b, s, fmt.Sprintf("T%08d", n.Add(1))))
		}
		mu.Lock()
		lat = append(lat, mine...)
		mu.Unlock()
	})
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "stores/s")
	b.ReportMetric(float64(p99(lat).Microseconds())/1000, "p99-ms")
}

// BenchmarkStoreLatencyPostgres is the time one P.relay.store adds before
// the gateway may acknowledge a message, one request at a time.
func BenchmarkStoreLatencyPostgres(b *testing.B) {
	s := benchSetup(b)
	s.start(b)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		lat = append(lat, storeOnce(b, s, fmt.Sprintf("L%08d", i)))
	}
	b.StopTimer()
	b.ReportMetric(float64(p99(lat).Microseconds())/1000, "p99-ms")
}

// BenchmarkWebhookDeliveriesPostgres is webhook deliveries per second to a
// receiver that answers 200 at once, over the webhook lanes, from the first store
// to the last delivery (each message also has its bus delivery).
func BenchmarkWebhookDeliveriesPostgres(b *testing.B) {
	var got atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { got.Add(1) }))
	defer srv.Close()
	s := benchSetup(b)
	s.cfg.WebhookURL = srv.URL
	s.start(b)
	// From the first store: deliveries start as soon as items are stored.
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		storeOnce(b, s, fmt.Sprintf("W%08d", i))
	}
	testwait.Every(b, 10*time.Minute, 10*time.Millisecond, "every webhook delivery", func() bool { return got.Load() >= int64(b.N) })
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "deliveries/s")
}

// BenchmarkReplayPagePostgres is one P.msg.replay answer of 100 stored
// messages as a bot asks it: read, opened, each measured as JSON against
// the payload bound, and sent.
func BenchmarkReplayPagePostgres(b *testing.B) {
	s := benchSetup(b)
	s.start(b)
	for i := range 100 {
		storeOnce(b, s, fmt.Sprintf("R%03d", i))
	}
	req, _ := json.Marshal(bus.MsgReplayRequest{Limit: 100})
	b.ResetTimer()
	for b.Loop() {
		msg, err := s.bus.nc.Request(subj.MsgReplay(), req, 30*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		var rep bus.MsgReplayReply
		if err := json.Unmarshal(msg.Data, &rep); err != nil || !rep.OK || len(rep.Messages) != 100 {
			b.Fatalf("replay: %v %d", err, len(rep.Messages))
		}
	}
}
