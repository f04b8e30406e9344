#!/usr/bin/env bash
# Rolling reload, measured: for 2 and 8 workers, the time from `netcluster reload` until every
# slot is served by the new generation (and until the old workers have drained), and wrk's
# latency percentiles during back-to-back reloads next to steady state, in the same run.
#
#   bash benches/reload.sh [SECONDS]          (default 10 s per wrk run)
#
# Needs wrk (installed from the distribution's packages if missing). Builds the release binary.
# Figures go to stdout; docs/benchmarks.md records a run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
if ! command -v wrk >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet
BIN=$PWD/target/release/netcluster
DIR=$(mktemp -d)
trap 'kill -9 ${PRIMARY:-0} 2>/dev/null || true; rm -rf "$DIR"' EXIT

percentiles() { # wrk output -> "p50 p99 requests errors"
  awk '/^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /requests in/ {req=$1}
       /Socket errors|Non-2xx/ {err=err $0 " "} END {print p50, p99, req, (err=="" ? "none" : err)}'
}

for WORKERS in 2 8; do
  CTL=$DIR/c$WORKERS.sock
  "$BIN" serve --app http --workers "$WORKERS" --listen 127.0.0.1:0 --control "$CTL" \
    >"$DIR/out$WORKERS" 2>"$DIR/err$WORKERS" &
  PRIMARY=$!
  for _ in $(seq 100); do grep -q "listening on" "$DIR/out$WORKERS" 2>/dev/null && break; sleep 0.05; done
  PORT=$(sed -n 's/.*:\([0-9]*\)$/\1/p' "$DIR/out$WORKERS" | head -1)
  "$BIN" scale "$WORKERS" --control "$CTL" >/dev/null
  URL=http://127.0.0.1:$PORT/

  steady=$(wrk -t2 -c32 -d"${SECS}s" --latency "$URL" | percentiles)

  # Reloads back to back for the whole wrk run.
  : >"$DIR/reloads$WORKERS"
  ( end=$((SECONDS + SECS)); while [ $SECONDS -lt $end ]; do
      "$BIN" reload --control "$CTL" >>"$DIR/reloads$WORKERS" 2>&1 || echo "reload failed" >>"$DIR/reloads$WORKERS"
    done ) &
  LOOP=$!
  during=$(wrk -t2 -c32 -d"${SECS}s" --latency "$URL" | percentiles)
  wait $LOOP
  reloads=$(grep -c "^reloaded" "$DIR/reloads$WORKERS" || true)
  failed=$(grep -c "reload failed" "$DIR/reloads$WORKERS" || true)
  serving=$(sed -n 's/.*all new serving after \([0-9]*\) ms.*/\1/p' "$DIR/reloads$WORKERS" | sort -n)
  took=$(sed -n 's/.* in \([0-9]*\) ms (all new.*/\1/p' "$DIR/reloads$WORKERS" | sort -n)
  median() { awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  echo "workers=$WORKERS reloads=$reloads failed=$failed"
  echo "  all-new-serving ms: median $(echo "$serving" | median), max $(echo "$serving" | tail -1)"
  echo "  reload incl. drain ms: median $(echo "$took" | median), max $(echo "$took" | tail -1)"
  echo "  steady:        p50 p99 requests errors = $steady"
  echo "  during reload: p50 p99 requests errors = $during"
  "$BIN" stop --control "$CTL" >/dev/null
  wait $PRIMARY 2>/dev/null || true
done
