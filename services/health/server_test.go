package health

import (
	"bufio"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// On Heroku without HEROKU_APP_URL there is no host we trust to redirect
// to: plain http is refused, not sent to the Host the request named.
func TestHerokuWithoutAppURLRefusesPlainHTTP(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.Heroku = true })
	req, _ := http.NewRequest(http.MethodGet, b.url+"/pair", nil)
	req.Host = "evil.example"
	req.Header.Set("X-Forwarded-Proto", "http")
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
		t.Fatalf("plain http on Heroku without HEROKU_APP_URL = %d to %q; want 400, no redirect",
			resp.StatusCode, resp.Header.Get("Location"))
	}
}

// A client that sends its body slowly (or never) cannot hold a connection:
// the server gives up after ReadTimeout.
func TestSlowClientsAreCutOff(t *testing.T) {
	t.Parallel()
	b := setup(t, func(o *Options) { o.ReadTimeout = 300 * time.Millisecond; o.WriteTimeout = time.Second })
	for _, tc := range []struct{ name, send string }{
		{"headers never end", "GET /status HTTP/1.1\r\nHost: x\r\n"},
		{"body never comes", "POST /signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken="},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := conn.Write([]byte(tc.send)); err != nil {
				t.Fatal(err)
			}
			// Well past the timeout, far below "forever".
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(conn)
			for {
				if _, err := r.ReadString('\n'); err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatal("the server still holds the connection of a client that stopped sending")
					}
					return // closed by the server
				}
			}
		})
	}
	// The pair page's polling still works.
	if code, _, _ := b.get(t, "/pair/state", bearer(testToken)); code != 200 {
		t.Fatalf("/pair/state = %d", code)
	}
}
