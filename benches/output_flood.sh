#!/usr/bin/env bash
# The primary's CPU while one program worker floods its stdout (`yes`), with the primary's
# stdout and stderr going to /dev/null, then to a pipe nobody reads (full after 64 KiB).
#
#   bash benches/output_flood.sh [SECONDS]     (default 5 s measured per case, after 3 s)
#
# Reads utime+stime of /proc/PID/stat (every thread of the process) over the window; prints
# cores used by the primary and by the worker, and the lines the primary dropped.
# Builds the release binary. docs/benchmarks.md records a run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
cargo build --release --quiet
BIN=$PWD/target/release/netcluster
DIR=$(mktemp -d)
HZ=$(getconf CLK_TCK)
trap 'kill -9 ${PRIMARY:-0} 2>/dev/null || true; rm -rf "$DIR"' EXIT

ticks() { # pid -> utime+stime in clock ticks (fields after the parenthesised name)
  sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

mkfifo "$DIR/full"
exec 3<>"$DIR/full" # held open, never read: writers block once it is full

printf '%-12s %14s %14s %16s\n' output primary_cores worker_cores dropped_lines
for CASE in devnull full-pipe; do
  case $CASE in devnull) OUT=/dev/null ;; full-pipe) OUT=$DIR/full ;; esac
  CTL=$DIR/$CASE.sock
  "$BIN" serve --workers 1 --listen 127.0.0.1:0 --ready-after 0 --control "$CTL" \
    -- sh -c 'exec yes flood' >"$OUT" 2>&1 &
  PRIMARY=$!
  for _ in $(seq 100); do "$BIN" status --control "$CTL" >/dev/null 2>&1 && break; sleep 0.05; done
  WORKER=$("$BIN" status --json --control "$CTL" | sed -n 's/.*"pid": \([0-9]*\),$/\1/p' | sed -n 2p)
  sleep 3 # past the first second's burst
  p0=$(ticks "$PRIMARY"); w0=$(ticks "$WORKER")
  sleep "$SECS"
  p1=$(ticks "$PRIMARY"); w1=$(ticks "$WORKER")
  DROPPED=$("$BIN" status --json --control "$CTL" | sed -n 's/^  "output_dropped_lines": \([0-9]*\),*$/\1/p')
  printf '%-12s %14s %14s %16s\n' "$CASE" \
    "$(awk -v t=$((p1 - p0)) -v hz="$HZ" -v s="$SECS" 'BEGIN {printf "%.3f", t / hz / s}')" \
    "$(awk -v t=$((w1 - w0)) -v hz="$HZ" -v s="$SECS" 'BEGIN {printf "%.3f", t / hz / s}')" \
    "${DROPPED:-?}"
  kill -9 "$PRIMARY" "$WORKER" 2>/dev/null || true
  wait "$PRIMARY" 2>/dev/null || true
done
