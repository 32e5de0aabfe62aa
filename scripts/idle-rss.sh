#!/usr/bin/env bash
# Measures the idle resident memory of `blacksky run` after it has spent
# SECONDS (default 60) failing to reach WhatsApp (this machine has no
# internet), with the embedded NATS, SQLite backup and health all running.
# Usage: scripts/idle-rss.sh [seconds]   (needs bin/blacksky: make build)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
bin="${BLACKSKY_BIN:-bin/blacksky}"
data="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
trap 'rm -rf "$data"' EXIT

DATA_DIR="$data" PORT="$port" LOG_LEVEL=warn RECONNECT_MIN=1s RECONNECT_MAX=10s \
  "$bin" run >"$data/log" 2>&1 &
pid=$!
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
sleep "$secs"
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
status=$(curl -fsS "http://127.0.0.1:$port/status" || echo '{}')
kill -TERM "$pid"
wait "$pid" && rc=0 || rc=$?
echo "idle RSS after ${secs}s: $((rss_kb / 1024)) MiB (peak $((hwm_kb / 1024)) MiB), exit code after SIGTERM: $rc"
echo "status: $status" | cut -c1-400
grep -c 'reconnect' "$data/log" | sed 's/^/log lines mentioning reconnect: /' || true
