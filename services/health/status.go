package health

import (
	"math"
	"net/http"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"slices"
	"time"

	"github.com/blacksky-md/blacksky/shared/bus"
	"github.com/blacksky-md/blacksky/shared/logging"
)

// States /status reports besides the services' own (docs/states.md lists
// every one; go test ./deploy checks it).
const (
	// StateMissing is a service health has never heard a heartbeat from.
	StateMissing = "missing"
	// StateStale is a service whose last heartbeat is too old.
	StateStale = "stale"
	// StateNotReady is the overall state while /readyz answers 503.
	StateNotReady = "not_ready"
)

// StatusDoc is the /status body. Without the token only the states are
// filled: no JID, no instance names, no error text, no memory figures.
type StatusDoc struct {
	Session   string                `json:"session"`
	Version   string                `json:"version"`
	Sandbox   bool                  `json:"sandbox,omitempty"` // WHATSAPP_SANDBOX: not WhatsApp
	State     string                `json:"state"`             // ok, degraded or not_ready
	Ready     bool                  `json:"ready"`
	Reasons   []string              `json:"reasons,omitempty"`
	UptimeS   int64                 `json:"uptime_s"`
	Detail    string                `json:"detail"` // "full" or "public"
	Auth      string                `json:"auth,omitempty"`
	Services  map[string]ServiceDoc `json:"services"`
	WhatsApp  WhatsAppDoc           `json:"whatsapp"`
	Backup    BackupDoc             `json:"backup"`
	Relay     RelayDoc              `json:"relay"`
	Memory    *MemoryDoc            `json:"memory,omitempty"`
	Instance  string                `json:"instance,omitempty"`
	StartedAt *time.Time            `json:"started_at,omitempty"`
}

// ServiceDoc is one service in /status.
type ServiceDoc struct {
	State     string `json:"state"`
	Fresh     bool   `json:"fresh"`
	Required  bool   `json:"required"`
	AgeMS     *int64 `json:"age_ms,omitempty"`
	Instance  string `json:"instance,omitempty"`
	Instances int    `json:"instances,omitempty"` // when more than one beats
}

// WhatsAppDoc is the connection in /status.
type WhatsAppDoc struct {
	State            string     `json:"state"`
	JID              string     `json:"jid,omitempty"` // masked: 1555****567
	ConnectedSince   *time.Time `json:"connected_since,omitempty"`
	Reconnects       *int64     `json:"reconnects,omitempty"`
	LastDisconnect   string     `json:"last_disconnect,omitempty"`
	LastDisconnectAt *time.Time `json:"last_disconnect_at,omitempty"`
}

// BackupDoc is the backup side of /status.
type BackupDoc struct {
	Enabled      bool         `json:"enabled"`
	State        string       `json:"state"`
	LastSnapshot *SnapshotDoc `json:"last_snapshot,omitempty"`
	LastError    string       `json:"last_error,omitempty"`
	LastErrorAt  *time.Time   `json:"last_error_at,omitempty"`
	// Replication is continuous replication (SYNC_INTERVAL), token only.
	Replication *ReplicationDoc `json:"replication,omitempty"`
}

// SnapshotDoc is the newest snapshot heard of.
type SnapshotDoc struct {
	ID     int64      `json:"id"`
	At     *time.Time `json:"at,omitempty"`
	Bytes  int64      `json:"bytes"`
	Reason string     `json:"reason,omitempty"`
}

// MemoryDoc shows the Go memory limit and the heap.
type MemoryDoc struct {
	// LimitBytes is debug.SetMemoryLimit(-1); null when there is none.
	LimitBytes     *int64 `json:"limit_bytes"`
	HeapInUseBytes uint64 `json:"heap_in_use_bytes"`
	TotalBytes     uint64 `json:"runtime_total_bytes"`
	Goroutines     int    `json:"goroutines"`
}

func (s *Service) status(w http.ResponseWriter, r *http.Request) {
	full := false
	switch s.auth.check(r) {
	case accessGranted:
		full = true
	case accessWrong:
		if !s.auth.wrong(r) {
			s.tooMany(w, r, "/status", false)
			return
		}
		// A monitor with a stale token should notice, not quietly get less.
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "wrong token"})
		return
	}
	writeJSON(w, http.StatusOK, s.statusDoc(full))
}

// statusDoc builds /status; full adds what only a token holder may see.
func (s *Service) statusDoc(full bool) StatusDoc {
	now := s.clock.Now()
	ready, reasons := s.tracker.Ready(s.req)
	d := StatusDoc{
		Session:  s.opts.Session,
		Version:  s.opts.Version,
		Sandbox:  s.opts.Sandbox,
		Ready:    ready,
		Reasons:  s.redactAll(reasons),
		UptimeS:  int64(now.Sub(s.started) / time.Second),
		Detail:   "public",
		Services: map[string]ServiceDoc{},
	}
	if s.auth.open() {
		d.Auth = "open: no HEALTH_TOKEN is set (development only)"
	}
	backupState, relayState := bus.StateDisabled, StateMissing
	for _, sv := range s.tracker.Services(slices.Concat(s.req.Services, []string{bus.ServiceRelay})...) {
		// Relay is required while WhatsApp is connected (Tracker.Ready).
		required := slices.Contains(s.req.Services, sv.Name) || sv.Name == bus.ServiceRelay && s.req.Heartbeats
		sd := ServiceDoc{State: s.redact(sv.State), Fresh: sv.Fresh, Required: required}
		if !sv.Fresh && sv.Seen {
			sd.State = StateStale
		}
		if full && sv.Seen {
			age := sv.Age.Milliseconds()
			sd.AgeMS, sd.Instance = &age, s.redact(sv.Instance)
			if sv.Others > 0 {
				sd.Instances = sv.Others + 1
			}
		}
		d.Services[s.redact(sv.Name)] = sd
		switch sv.Name {
		case bus.ServiceBackup:
			backupState = sd.State
		case bus.ServiceRelay:
			relayState = sd.State
		}
	}
	if !s.opts.BackupEnabled {
		backupState = bus.StateDisabled
	}
	wa := s.tracker.WhatsApp()
	d.WhatsApp.State = s.redact(wa.State)
	d.Backup = BackupDoc{Enabled: s.opts.BackupEnabled, State: backupState}
	d.Relay = s.relayDoc(relayState, full)
	switch {
	case !ready:
		d.State = StateNotReady
	case backupState == bus.StateDegraded:
		d.State = bus.StateDegraded
	default:
		d.State = bus.StateOK
	}
	if !full {
		return d
	}

	d.Detail = "full"
	d.Instance = s.opts.Instance
	started := s.started.UTC()
	d.StartedAt = &started
	d.WhatsApp.JID = MaskJID(wa.JID)
	d.WhatsApp.ConnectedSince = wa.ConnectedSince
	d.WhatsApp.Reconnects = &wa.Reconnects
	d.WhatsApp.LastDisconnect = s.redact(wa.LastDisconnect)
	d.WhatsApp.LastDisconnectAt = wa.LastDiscAt
	b := s.tracker.Backup()
	if b.LastID != 0 || b.LastAt != nil {
		d.Backup.LastSnapshot = &SnapshotDoc{ID: b.LastID, At: b.LastAt, Bytes: b.LastBytes, Reason: s.redact(b.LastReason)}
	}
	d.Backup.LastError = s.redact(b.LastErr)
	d.Backup.LastErrorAt = b.LastErrAt
	d.Backup.Replication = s.replicationDoc()
	d.Memory = readMemory()
	return d
}

// redact hides secrets in text that came over the bus: other services'
// errors and states are not ours to trust.
func (s *Service) redact(v string) string { return logging.Redact(v, s.opts.Secrets) }

func (s *Service) redactAll(vs []string) []string {
	for i, v := range vs {
		vs[i] = s.redact(v)
	}
	return vs
}

// memSamples are read without stopping the world (runtime.ReadMemStats
// would, on every /status under load).
var memSamples = []string{
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/total:bytes",
}

func readMemory() *MemoryDoc {
	samples := make([]rtmetrics.Sample, len(memSamples))
	for i, n := range memSamples {
		samples[i].Name = n
	}
	rtmetrics.Read(samples)
	val := func(i int) uint64 {
		if samples[i].Value.Kind() == rtmetrics.KindUint64 {
			return samples[i].Value.Uint64()
		}
		return 0
	}
	m := &MemoryDoc{
		// objects + unused is HeapInuse in MemStats terms.
		HeapInUseBytes: val(0) + val(1),
		TotalBytes:     val(2),
		Goroutines:     runtime.NumGoroutine(),
	}
	if limit := debug.SetMemoryLimit(-1); limit != math.MaxInt64 {
		m.LimitBytes = &limit
	}
	return m
}
