#!/usr/bin/env bash
# HTTP throughput of examples/cluster_http under each scheduling policy, next to Node's own
# cluster (round robin and shared) serving the same response, all in one run.
#
#   bash benches/cluster_http.sh [WORKERS] [SECONDS]
#
# Needs wrk and node; loopback only. Each configuration is loaded twice with wrk (2 threads,
# 64 connections): with keep-alive (the request path), and with `Connection: close` (a new
# connection per request: the accept and hand-off path, where the policies differ). Prints the
# requests/s of each and its ratio to Node's round-robin cluster (the anchor) in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2}
seconds=${2:-10}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 2; }
command -v node >/dev/null || { echo "node is not installed"; exit 2; }
cargo build --release --quiet --example cluster_http
bin=target/release/examples/cluster_http

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run NAME COMMAND...: starts the server (which prints "listening on ADDR"), loads it, stops it.
run() {
  local name=$1; shift
  local out; out=$(mktemp)
  "$@" >"$out" 2>/dev/null &
  local pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$out" | head -1)
  sleep 0.5
  local rps; rps=$(wrk -t2 -c64 -d"${seconds}s" "http://$addr/" | awk '/Requests\/sec/ {print $2}')
  local close; close=$(wrk -t2 -c64 -d"${seconds}s" -H 'Connection: close' "http://$addr/" | awk '/Requests\/sec/ {print $2}')
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local split; split=$(grep -o 'connections [0-9]*' "$out" | awk '{print $2}' | paste -sd/ - || true)
  rm -f "$out"
  echo "$name $rps $close ${split:--}"
}

results=$(mktemp)
{
  port=$(free_port); run node-round-robin env NODE_CLUSTER_SCHED_POLICY=rr node benches/node_cluster_http.js "$workers" "$port"
  port=$(free_port); run node-shared env NODE_CLUSTER_SCHED_POLICY=none node benches/node_cluster_http.js "$workers" "$port"
  for policy in round-robin shared reuseport; do
    run "netcluster-$policy" "$bin" --workers "$workers" --policy "$policy" --listen 127.0.0.1:0
  done
} | tee "$results"

anchor=$(awk '$1 == "node-round-robin" {print $2}' "$results")
anchor_close=$(awk '$1 == "node-round-robin" {print $3}' "$results")
echo
echo "| configuration | keep-alive req/s | ratio | Connection: close req/s | ratio | connections per worker |"
echo "|---|---|---|---|---|---|"
awk -v a="$anchor" -v c="$anchor_close" \
  '{ printf "| %s | %.0f | %.2f× | %.0f | %.2f× | %s |\n", $1, $2, $2 / a, $3, $3 / c, $4 }' "$results"
rm -f "$results"
