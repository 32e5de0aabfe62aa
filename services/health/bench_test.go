package health

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkStatus measures /status under parallel load through a real HTTP
// server (keep-alive connections): go test -run '^$' -bench Status -benchtime 2s
func BenchmarkStatus(b *testing.B) {
	for _, tc := range []struct {
		name string
		hdr  string
	}{
		{"public", ""},
		{"full", "Bearer " + testToken},
	} {
		b.Run(tc.name, func(b *testing.B) {
			bu := setup(b, nil)
			bu.healthy(b)
			srv := httptest.NewServer(bu.svc.Handler())
			defer srv.Close()
			tr := &http.Transport{MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest(http.MethodGet, srv.URL+"/status", nil)
					if tc.hdr != "" {
						req.Header.Set("Authorization", tc.hdr)
					}
					resp, err := client.Do(req)
					if err != nil {
						b.Error(err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}
