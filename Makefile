# The same targets serve people and CI (.ci/run calls `make ci`).
GO       ?= go
PKGS     ?= ./...
# staticcheck is a tool of the module (go.mod `tool` line): the version is
# pinned in go.sum and nothing has to be on PATH.
STATICCHECK ?= $(GO) tool staticcheck
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse --short HEAD 2>/dev/null)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)

.PHONY: build test test/short lint fmt bench bench-backup bench-relay crash-soak fuzz rss relay-soak ci

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/blacksky ./cmd/blacksky

# The README's test command: every test, with the race detector, against the
# real PostgreSQL at TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test).
test:
	$(GO) test -race -count=1 -timeout 20m $(PKGS)

test/short:
	$(GO) test -count=1 $(PKGS)

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt would change:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet $(PKGS)
	$(STATICCHECK) $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go')

# Benchmarks named by the issues; short runs, figures in the issue notes.
bench:
	$(GO) test -run '^$$' -bench . -benchtime 2s ./shared/bus
	$(GO) test -run '^$$' -bench . -benchtime 3x ./services/backup/...
	$(GO) test -run '^$$' -bench . -benchtime 2s ./services/health/...
	$(GO) test -run '^$$' -bench . -benchtime 3x ./services/gateway/sandbox/
	$(MAKE) bench-relay

# Issue 11's relay figures: P.relay.store per second and its p99 on
# PostgreSQL, webhook deliveries per second, a replay page, and the
# gateway's hand-over to relay; BENCH_COUNT runs each, report the medians.
bench-relay:
	$(GO) test -run '^$$' -bench . -benchtime 3000x -count $(BENCH_COUNT) ./services/relay/
	$(GO) test -run '^$$' -bench MessageHandOver -count $(BENCH_COUNT) ./services/gateway/

# Issue 10's backup figures, reproducible: the incremental engine against the
# full snapshot (1% delta, restore of a base and 1,000 deltas) and the
# service's request-to-committed latency; 5 runs each, report the medians.
# BENCH_COUNT overrides the number of runs.
BENCH_COUNT ?= 5
bench-backup:
	$(GO) test -run '^$$' -bench . -count $(BENCH_COUNT) -timeout 60m ./services/backup/incr/
	$(GO) test -run '^$$' -bench . -count $(BENCH_COUNT) -timeout 60m ./services/backup/ ./services/backup/snapshot/

# Issue 10's crash soak: the built binary on PostgreSQL, SIGKILLed at random
# moments under a writer at about 50 commits/s, each kill followed by an
# empty-disk restore that must hold every write committed SYNC_INTERVAL +
# 0.5 s before it. Logs the seed (CRASH_SEED replays it), the loss window at
# each kill and the heartbeat's replication lag, p50/p99.
CRASH_ROUNDS ?= 20
crash-soak:
	BLACKSKY_CRASH_SOAK_ROUNDS=$(CRASH_ROUNDS) BLACKSKY_CRASH_SEED=$(CRASH_SEED) \
	  $(GO) test -count=1 -v -timeout 60m -run '^TestCrashSoak$$' ./e2e/

# A short pass of every fuzz target.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzBackupRequestDecode$$' -fuzztime 20s ./shared/bus

# Issue 11's full delivery test: 10,000 incoming messages from 200 contacts
# through `blacksky run` on PostgreSQL, a webhook failing 35% of its
# requests, two SIGKILLs; figures in its log (FIGURES line). E2E_SEED=N
# repeats a run's webhook answers and kill moments.
relay-soak:
	E2E_SOAK=1 $(GO) test -count=1 -v -timeout 120m -run '^TestRelaySoak$$' ./e2e/

# Idle RSS of `blacksky run` after 60 s of failed WhatsApp connects.
rss: build
	scripts/idle-rss.sh

ci: lint test
