#!/usr/bin/env bash
# A soak of recycles under load: `netcluster serve --app http` with 2 workers recycled after
# 100 connections (+0..20), wrk against it with fresh connections, until N recycles (default
# 1000). Prints the failed requests (wrk's socket errors and non-2xx answers: must be 0), the
# primary's descriptors and RSS before and after, and recycles per minute.
#
#   bash benches/recycle_soak.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-1000}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet --bin netcluster
bin=target/release/netcluster
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
NETCLUSTER_CONTROL="$dir/c.sock" "$bin" serve --app http --workers 2 --listen 127.0.0.1:0 \
  --max-requests 100 --max-requests-jitter 20 >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$dir/out")
sleep 1
fds() { ls "/proc/$pid/fd" | wc -l; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
fd0=$(fds); rss0=$(rss)
start=$(date +%s.%N)
wrk -t2 -c16 -d600s -H 'Connection: close' "http://$addr/" >"$dir/wrk" 2>&1 &
wrk_pid=$!
while [ "$(grep -c 'slot recycled' "$dir/err")" -lt "$want" ]; do
  kill -0 "$wrk_pid" 2>/dev/null || break
  sleep 0.5
done
kill -INT "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" 2>/dev/null || true
end=$(date +%s.%N)
n=$(grep -c 'slot recycled' "$dir/err")
sleep 2
fd1=$(fds); rss1=$(rss)
errors=$(grep -E 'Socket errors|Non-2xx' "$dir/wrk" || echo "none")
requests=$(awk '/requests in/ {print $1}' "$dir/wrk")
echo "recycles: $n in $(echo "$end - $start" | bc) s: $(echo "$n * 60 / ($end - $start)" | bc) a minute"
echo "requests: $requests; failed: $errors"
echo "primary descriptors: $fd0 before, $fd1 after; RSS: $rss0 KiB before, $rss1 KiB after"
